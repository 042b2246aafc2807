"""``ttedge launch`` (ttedge/launcher.py): CPU ranks started and watched as processes — the same text as
one process, a failed rank stopping the group, SIGTERM draining it — plus the multi-machine rendezvous on
loopback, the tt-run command line for multi-host TT meshes, and one-line errors for launches that cannot
work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
from tests.server.live import start_server_process
from ttedge.launcher import CpuGroup, LaunchError, exec_tt_run, free_port, tt_run_command

GENERATE = ["generate", "--prompt", "hello there", "--max-tokens", "12", "--weights", "float32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(num_heads=4, num_kv_heads=2)
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("launch") / "tiny", config, random_state_dict(config, 1)
    )


def ttedge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ttedge.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_exit(process: subprocess.Popen[str], timeout: float) -> int:
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()


def test_tensor_parallel_generate_prints_what_one_process_prints(tiny: Path) -> None:
    alone = ttedge(*GENERATE, "--model", str(tiny))
    launched = ttedge("launch", "--tp", "2", "--", *GENERATE, "--model", str(tiny))
    assert alone.returncode == 0, alone.stderr
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout == alone.stdout
    assert "rank 1 of 2" in launched.stderr


def test_a_split_that_does_not_divide_fails_the_whole_group(tiny: Path) -> None:
    """4 query heads over 3 ranks: every rank refuses before joining, and the launcher reports it."""
    launched = ttedge("launch", "--tp", "3", "--", *GENERATE, "--model", str(tiny), timeout=120)
    assert launched.returncode == 2
    assert "4 query heads do not divide over 3 devices" in launched.stderr
    assert "exited with code 2; stopping the other ranks" in launched.stderr


def test_serving_group_answers_like_one_process_and_stops_when_a_rank_dies(tiny: Path) -> None:
    request = {"model": "tiny", "prompt": "the launcher", "max_tokens": 16, "temperature": 0}
    server, url = start_server_process(["serve", "--model", str(tiny), "--weights", "float32", "--port", "0"])
    try:
        expected = httpx.post(f"{url}/completions", json=request, timeout=60).json()["choices"][0]["text"]
    finally:
        server.send_signal(signal.SIGTERM)
        wait_exit(server, 60)

    launcher, url = start_server_process(
        ["launch", "--tp", "2", "--", "serve", "--model", str(tiny), "--weights", "float32", "--port", "0"]
    )
    try:
        answer = httpx.post(f"{url}/completions", json=request, timeout=60).json()
        assert answer["choices"][0]["text"] == expected
        ranks = children(launcher.pid)
        assert len(ranks) == 2
        os.kill(max(ranks), signal.SIGKILL)  # rank 1 started second
        assert wait_exit(launcher, 60) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert "rank 1 exited with code -9; stopping the other ranks" in launcher.communicate()[1]
    assert not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in ranks)


def test_sigterm_stops_a_serving_group_cleanly(tiny: Path) -> None:
    launcher, _ = start_server_process(
        ["launch", "--tp", "2", "--", "serve", "--model", str(tiny), "--weights", "float32", "--port", "0"]
    )
    ranks = children(launcher.pid)
    launcher.send_signal(signal.SIGTERM)
    assert wait_exit(launcher, 60) == 0, launcher.communicate()[1]
    assert not any(_alive(pid) for pid in ranks)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_ranks_do_not_outlive_a_killed_launcher(tiny: Path) -> None:
    launcher, _ = start_server_process(
        ["launch", "--tp", "2", "--", "serve", "--model", str(tiny), "--weights", "float32", "--port", "0"]
    )
    ranks = children(launcher.pid)
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in ranks)


def _alive(pid: int) -> bool:
    """Running (a zombie already reaped by nobody counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_two_machines_meet_through_the_rendezvous(tiny: Path) -> None:
    """Two launches with --nnodes 2, as on two machines (here both on loopback)."""
    alone = ttedge(*GENERATE, "--model", str(tiny))
    port = str(free_port())
    common = ["launch", "--tp", "2", "--nnodes", "2", "--master-port", port]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ttedge.cli",
                *common,
                "--node-rank",
                str(rank),
                "--",
                *GENERATE,
                "--model",
                str(tiny),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert outputs[0][0] == alone.stdout
    assert outputs[1][0] == ""  # only global rank 0 generates


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tp", "2", "--", "models"], "launch runs one of serve, generate after `--`, not models"),
        (["--tp", "2"], "not nothing"),
        (
            ["--tp", "3", "--mesh", "n300", "--", "serve"],
            "--tp 3 does not match mesh n300, which has 2 chips",
        ),
        (["--", "serve"], "give --tp N, or --mesh"),
        (["--tp", "2", "--nnodes", "2", "--", "serve"], "needs --master-port"),
        (
            ["--tp", "3", "--nnodes", "2", "--master-port", "1", "--", "serve"],
            "do not divide over --nnodes 2",
        ),
        (["--tp", "2", "--node-rank", "1", "--", "serve"], "--node-rank 1 is not in a group of --nnodes 1"),
        (["--tp", "2", "--hosts", "a,b", "--", "serve"], "needs --mesh-graph"),
        (["--mesh", "nowhere.yaml", "--", "serve"], "nowhere.yaml"),
        (["--tp", "2", "--", "serve", "--device", "tt"], "--tp 2 on TT chips needs --mesh"),
    ],
)
def test_launches_that_cannot_work_are_one_line_errors(args: list[str], message: str) -> None:
    result = ttedge("launch", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_one_tt_host_runs_the_mesh_in_this_process() -> None:
    """No ranks are started: the command runs in this process (which, without ttnn here, says so)."""
    command = ["generate", "--device", "tt", "--prompt", "hi"]
    result = ttedge("launch", "--mesh", "n300", "--", *command, timeout=60)
    assert result.returncode == 2
    assert "--device tt needs the ttnn package" in result.stderr
    assert "rank 0 of" not in result.stderr


def test_rank_environments_follow_torchrun() -> None:
    group = CpuGroup(tp=4, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500)
    assert group.environments(29500) == [
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank - 2),
            "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        }
        for rank in (2, 3)
    ]


def test_multi_host_tt_goes_through_tt_run(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = tt_run_command(["serve", "--port", "8000"], "two.textproto", ["h2", "h1"], "mesh.yaml", 29600)
    assert argv == [
        "tt-run", "-m", "two.textproto", "--hosts", "h2,h1",
        "--mpi-args", "-x MASTER_ADDR=h1 -x MASTER_PORT=29600",
        sys.executable, "-m", "ttedge.cli", "serve", "--port", "8000",
        "--device", "tt", "--mesh", "mesh.yaml",
    ]  # fmt: skip
    with pytest.raises(LaunchError, match="needs --hosts"):
        tt_run_command(["serve"], "galaxy.textproto", [], None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(LaunchError, match=r"tt-run .* is not on PATH"):
        exec_tt_run(argv)
