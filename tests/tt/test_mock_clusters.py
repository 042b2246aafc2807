"""The mock clusters open, run ops and collectives, and reuse the firmware shipped in the ttnn wheel.

Mock validation (no numerics): see tests/tt/conftest.py.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import ttnn

from tests.tt.mock.riscv_tt_elf_gxx import elf_symbols
from tests.tt.support import zeros

WORMHOLE_WORKER_GRID = (8, 8)  # 10 x 8 Tensix, one or two rows harvested, one row for dispatch
BLACKHOLE_WORKER_GRID = (13, 10)  # 14 x 10 Tensix, one column for dispatch


@pytest.fixture
def own_kernel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kernel cache for this test alone, so that it holds only the builds this test caused."""
    monkeypatch.setenv("TT_METAL_CACHE", str(tmp_path / "tt-metal-cache"))
    return tmp_path / "tt-metal-cache"


def only_build(cache: Path) -> Path:
    """The folder of the one firmware build key the runtime used (named after the key)."""
    [build] = cache.glob("tt-metal-cache[0-9]*")
    return build


def entry_point(elf: Path) -> int:
    return struct.unpack_from("<I", elf.read_bytes(), 24)[0]


@pytest.mark.parametrize(
    ("board", "arch", "grid"),
    [
        ("n150", ttnn.Arch.WORMHOLE_B0, WORMHOLE_WORKER_GRID),
        ("p150", ttnn.Arch.BLACKHOLE, BLACKHOLE_WORKER_GRID),
    ],
)
def test_board_runs_ops_on_the_shipped_firmware(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
    own_kernel_cache: Path,
    board: str,
    arch: ttnn.Arch,
    grid: tuple[int, int],
) -> None:
    device = mock_device(board)
    assert device.arch() == arch
    worker_grid = device.compute_with_storage_grid_size()
    assert (worker_grid.x, worker_grid.y) == grid

    a = zeros(device, (1, 1, 64, 128))
    assert ttnn.add(a, a).shape == ttnn.Shape([1, 1, 64, 128])

    # The stand-in's version line and the descriptor's harvesting give a firmware build key the wheel
    # ships: the runtime built no firmware, and kernels start right where the shipped firmware's text ends.
    build = only_build(own_kernel_cache)
    assert not (build / "firmware").exists()
    firmware = (
        Path(ttnn.__file__).parent / "tt_metal" / "pre-compiled" / build.name.removeprefix("tt-metal-cache")
    )
    text_end = elf_symbols(str(firmware / "brisc" / "brisc_weakened.elf"))["__fw_export_text_end"]
    brisc_kernels = list(build.glob("kernels/*/*/brisc/brisc.elf"))
    assert brisc_kernels
    assert {entry_point(elf) for elf in brisc_kernels} == {text_end}


@pytest.mark.parametrize("shape", [(1, 2), (1, 8)], ids=["n300-1x2", "t3k-1x8"])
def test_mesh_runs_collectives(
    mock_mesh: Callable[[tuple[int, int]], ttnn.MeshDevice], shape: tuple[int, int]
) -> None:
    mesh = mock_mesh(shape)
    chips = shape[0] * shape[1]
    assert mesh.get_num_devices() == chips

    # SmolLM2's MLP width, split as the MLP down projection's input would be.
    partial = zeros(mesh, (1, 1, 32, 1536))
    scattered = ttnn.reduce_scatter(partial, dim=3, topology=ttnn.Topology.Linear)
    assert scattered.shape == ttnn.Shape([1, 1, 32, 1536 // chips])
    gathered = ttnn.all_gather(scattered, dim=3, topology=ttnn.Topology.Linear)
    assert gathered.shape == ttnn.Shape([1, 1, 32, 1536])


def test_unshipped_configuration_builds_firmware_with_the_stand_in(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
    own_kernel_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slow dispatch on an unharvested n150 has no pre-compiled firmware: the runtime links its own,
    and the stand-in answers each firmware link with the shipped ELF of that processor."""
    unharvested = tmp_path / "n150.yaml"
    descriptor = (Path(__file__).parent / "mock" / "n150.yaml").read_text()
    unharvested.write_text(descriptor.replace("harvest_mask: 32", "harvest_mask: 0"))
    monkeypatch.setenv("TT_METAL_SLOW_DISPATCH_MODE", "1")

    device = mock_device(unharvested)
    a = zeros(device, (1, 1, 32, 32))
    ttnn.add(a, a)

    build = only_build(own_kernel_cache)
    processors = {elf.parent.name for elf in build.glob("firmware/*/*.elf") if "_weakened" not in elf.name}
    assert {"brisc", "ncrisc", "trisc0", "trisc1", "trisc2"} <= processors


def test_torch_path_when_installed(mock_device: Callable[[str | Path], ttnn.MeshDevice]) -> None:
    """`setup_tt.sh --with-torch` adds torch for ttnn.from_torch/to_torch and ttedge.checkpoint."""
    torch = pytest.importorskip("torch", reason="opt-in in .venv-tt: bash scripts/setup_tt.sh --with-torch")
    # The checkpoint readers hand out torch tensors: with torch, the TT port can load real weights.
    importlib.import_module("ttedge.checkpoint")

    device = mock_device("n150")
    weight = ttnn.from_torch(
        torch.ones(576, 1536), dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT, device=device
    )
    assert weight.dtype == ttnn.bfloat8_b
    # Data never reaches a mock device: what comes back is zeros, whatever went in.
    assert not ttnn.to_torch(weight).any()
