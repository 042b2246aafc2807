"""TT validation tier: the pinned ttnn library on mock Tenstorrent clusters -- MOCK VALIDATION, NO NUMERICS.

Each test opens a mock cluster (tests/tt/mock/*.yaml) through `mock_device` or `mock_mesh`. ttnn then
runs for real up to the hardware: op validation, buffer allocation and program creation; kernels are
"built" by the stand-in compiler tests/tt/mock/riscv_tt_elf_gxx.py and data never reaches a device.
Run it with `bash scripts/test_tt.sh`; docs/tt-validation.md says what it proves and what it cannot.

Every test runs in a forked child process: the driver reads the cluster descriptor once per process, and
a test that hangs inside the library (a failed kernel build once hung a later op) must not take the
session with it. SIGALRM ends a child after TEST_TIMEOUT_S whatever it is doing.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import pytest

# Not re-exported by pytest; pytest-xdist and pytest-forked run tests elsewhere through it too.
from _pytest.runner import runtestprotocol

ttnn = pytest.importorskip(
    "ttnn", reason="the TT validation tier needs the pinned ttnn: run it with `bash scripts/test_tt.sh`"
)

MOCK_DIR = Path(__file__).parent / "mock"
# Single-chip mock boards, and the board a mesh of N chips is opened on.
BOARDS = ("n150", "p150")
BOARD_FOR_CHIPS = {1: "n150", 2: "n300", 8: "t3k"}
TEST_TIMEOUT_S = 180
LABEL = "mock validation (no numerics)"
# test_numerics_emulation.py: the one place numbers are computed, on the host, by a model of the port.
EMULATION_LABEL = "host emulation of the port's numerics against the torch reference (no device)"


def _compiler_paths() -> list[Path]:
    spec = importlib.util.find_spec("ttnn")
    assert spec is not None and spec.submodule_search_locations
    # Where ttnn looks for the RISC-V compiler, in its order.
    return [
        Path(spec.submodule_search_locations[0]) / "runtime/sfpi/compiler/bin/riscv-tt-elf-g++",
        Path("/opt/tenstorrent/sfpi/compiler/bin/riscv-tt-elf-g++"),
    ]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"tt_mock: {LABEL}: ttnn on a mock cluster with a stand-in compiler")
    config.addinivalue_line("markers", f"tt_emulation: {EMULATION_LABEL}")
    if not any(path.exists() for path in _compiler_paths()):
        raise pytest.UsageError(
            "ttnn finds no RISC-V compiler: run `bash scripts/setup_tt.sh` to install the stand-in"
        )
    # A private kernel cache per session: binaries from the stand-in compiler are not programs and must
    # never land where a real toolchain's cache could reuse them.
    os.environ["TT_METAL_CACHE"] = tempfile.mkdtemp(prefix="ttedge-tt-metal-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    # Forked children leave with os._exit and never get here: only the session removes the cache.
    if "TT_METAL_CACHE" in os.environ:
        shutil.rmtree(os.environ.pop("TT_METAL_CACHE"), ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> str:
    # ttnn 0.81.1 has no __version__.
    return (
        f"TT validation tier: ttnn {metadata.version('ttnn')} on mock clusters -- every result is {LABEL}, "
        f"except tests marked tt_emulation: {EMULATION_LABEL}"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _in_tier(item):
            emulation = item.get_closest_marker("tt_emulation") is not None
            if not emulation:
                item.add_marker(pytest.mark.tt_mock)
            item.user_properties.append(("validation", EMULATION_LABEL if emulation else LABEL))


def _in_tier(item: pytest.Item) -> bool:
    return item.path.is_relative_to(Path(__file__).parent)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not _in_tier(item):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _run_forked(item):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _run_forked(item: pytest.Item) -> list[pytest.TestReport]:
    """Run one test's setup, call and teardown in a child process; its reports come back pickled
    (pytest's serializable form, whose tuples JSON would turn into lists)."""
    config = item.config
    read_end, write_end = os.pipe()
    start = time.time()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            signal.alarm(TEST_TIMEOUT_S)  # the default action ends the process, even inside library code
            try:
                reports = runtestprotocol(item, log=False)
                result = {
                    "reports": [
                        config.hook.pytest_report_to_serializable(config=config, report=r) for r in reports
                    ]
                }
            except BaseException:  # whatever broke the child must reach the session's report
                result = {"error": traceback.format_exc()}
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(result, pipe)
        finally:
            os._exit(0)  # never return into the session's own test loop
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = pickle.loads(payload) if payload else {}
    if "reports" in result:
        return [
            config.hook.pytest_report_from_serializable(config=config, data=data)
            for data in result["reports"]
        ]
    if "error" in result:
        why = f"the test's process failed outside the test:\n{result['error']}"
    elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        why = f"timed out: the test's process was ended after {TEST_TIMEOUT_S} s"
    elif os.WIFSIGNALED(status):
        why = f"the test's process died of {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        why = f"the test's process exited with status {os.WEXITSTATUS(status)} before reporting"
    return [
        pytest.TestReport(
            nodeid=item.nodeid,
            location=item.location,
            keywords=dict.fromkeys(item.keywords, 1),
            outcome="failed",
            longrepr=f"{item.nodeid}: {why}",
            when="call",
            duration=time.time() - start,
            user_properties=item.user_properties,
        )
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = ", ".join(
        f"{len(terminalreporter.stats.get(key, []))} {key}"
        for key in ("passed", "failed", "error", "skipped")
    )
    emulated = sum(
        "tt_emulation" in report.keywords
        for key in ("passed", "failed")
        for report in terminalreporter.stats.get(key, [])
        if report.when == "call"
    )
    also = f" ({emulated} of them {EMULATION_LABEL})" if emulated else ""
    terminalreporter.write_line(
        f"TT validation tier, {LABEL}: {counts}{also} -- op checks and allocation on mock clusters; "
        "no kernel was compiled, no data reached a device, nothing was timed"
    )


class _MockCluster:
    """Opens one mock cluster for a test and closes it afterwards.

    The driver reads TT_METAL_MOCK_CLUSTER_DESC_PATH once per process, so a test opens one cluster.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._open: ttnn.MeshDevice | None = None
        self._fabric = False

    def open(self, descriptor: Path, shape: tuple[int, int]) -> ttnn.MeshDevice:
        if self._open is not None:
            raise RuntimeError("one mock cluster per test: the driver reads its descriptor once per process")
        self._monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(descriptor))
        if shape == (1, 1):
            self._open = ttnn.open_device(device_id=0)
        else:
            # Collectives travel over the fabric; a line suits every mesh shape opened here.
            ttnn.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
            self._fabric = True
            self._open = ttnn.open_mesh_device(ttnn.MeshShape(*shape))
        return self._open

    def close(self) -> None:
        if self._open is not None:
            ttnn.close_mesh_device(self._open)
        if self._fabric:
            ttnn.set_fabric_config(ttnn.FabricConfig.DISABLED)


@pytest.fixture
def _mock_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[_MockCluster]:
    cluster = _MockCluster(monkeypatch)
    yield cluster
    cluster.close()


@pytest.fixture
def mock_device(_mock_cluster: _MockCluster) -> Callable[[str | Path], ttnn.MeshDevice]:
    """Opens the single chip of a mock board: `mock_device("n150")` (Wormhole) or `mock_device("p150")`
    (Blackhole), or of a single-chip descriptor file a test wrote. Returns a 1x1 MeshDevice, closed
    after the test."""

    def open_board(board: str | Path) -> ttnn.MeshDevice:
        if isinstance(board, Path):
            return _mock_cluster.open(board, (1, 1))
        if board not in BOARDS:
            raise ValueError(f"mock_device opens a single-chip board ({', '.join(BOARDS)}), not {board!r}")
        return _mock_cluster.open(MOCK_DIR / f"{board}.yaml", (1, 1))

    return open_board


@pytest.fixture
def mock_mesh(_mock_cluster: _MockCluster) -> Callable[[tuple[int, int]], ttnn.MeshDevice]:
    """Opens a mesh on the mock system with that many chips: `mock_mesh((1, 2))` on an n300,
    `mock_mesh((1, 8))` or `mock_mesh((2, 4))` on a T3K, with a 1-D fabric. Closed after the test."""

    def open_mesh(shape: tuple[int, int]) -> ttnn.MeshDevice:
        chips = shape[0] * shape[1]
        if chips not in BOARD_FOR_CHIPS:
            raise ValueError(f"no mock system with {chips} chips (have: {sorted(BOARD_FOR_CHIPS)})")
        return _mock_cluster.open(MOCK_DIR / f"{BOARD_FOR_CHIPS[chips]}.yaml", shape)

    return open_mesh
