"""``ttedge launch``: run ``serve`` or ``generate`` tensor-parallel.

- **CPU, one machine or several:** this machine's ranks are started here as processes, with
  torch.distributed's environment rendezvous (the variables torchrun sets): global rank 0 serves or
  generates, every other rank runs its shard of each step (``runtime/tensor_parallel.py``). The
  launcher watches its ranks: when one fails, it stops the others and exits with that rank's code, so
  a group never limps on with a dead shard. On several machines, run the same launch on each with
  ``--nnodes``, ``--node-rank`` and rank 0's ``--master-addr``.
- **TT, one host:** the chips of a mesh are one process (ttnn mesh tensors and CCL ops), so the
  command runs here with ``--mesh`` passed on.
- **TT, several hosts:** Tenstorrent's own launcher, ``tt-run`` (MPI, shipped with ttnn), starts the
  ranks from a mesh graph descriptor and a host list; this builds its command line rather than invent
  a transport.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

COMMANDS = ("serve", "generate")
# How long the other ranks get to leave on their own once rank 0 has finished, or once a rank has failed,
# before they are killed.
_GRACE_S = 10.0
_POLL_S = 0.1


class LaunchError(ValueError):
    """A launch that cannot start as asked; the message says why."""


@dataclass(frozen=True)
class CpuGroup:
    """This machine's part of a CPU tensor-parallel group."""

    tp: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: any free port (one machine only)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise LaunchError(f"--tp must be at least 1, got {self.tp}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(f"--node-rank {self.node_rank} is not in a group of --nnodes {self.nnodes}")
        if self.tp % self.nnodes:
            raise LaunchError(f"--tp {self.tp} ranks do not divide over --nnodes {self.nnodes} machines")
        if self.nnodes > 1 and self.master_port is None:
            raise LaunchError("a group over several machines needs --master-port (the same on every machine)")

    @property
    def local_ranks(self) -> int:
        return self.tp // self.nnodes

    def environments(self, port: int) -> list[dict[str, str]]:
        """The rendezvous variables of each rank started on this machine."""
        first = self.node_rank * self.local_ranks
        return [
            {
                "RANK": str(first + local),
                "LOCAL_RANK": str(local),
                "WORLD_SIZE": str(self.tp),
                "LOCAL_WORLD_SIZE": str(self.local_ranks),
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(port),
            }
            for local in range(self.local_ranks)
        ]


def check_command(command: Sequence[str]) -> None:
    if not command or command[0] not in COMMANDS:
        given = " ".join(command) or "nothing"
        raise LaunchError(f"launch runs one of {', '.join(COMMANDS)} after `--`, not {given}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_cpu_group(group: CpuGroup, command: Sequence[str], verbose: bool = False) -> int:
    """Start this machine's ranks of ``ttedge COMMAND``, wait for them, and return the group's exit code:
    rank 0's when every rank ends well, else the first failed rank's."""
    check_command(command)
    argv = [sys.executable, "-m", "ttedge.cli", *(["-v"] if verbose else []), *command]
    port = group.master_port or free_port()
    ranks = []
    for env in group.environments(port):
        ranks.append(
            (
                int(env["RANK"]),
                subprocess.Popen(
                    argv, env={**os.environ, **env}, start_new_session=True, preexec_fn=_die_with_launcher
                ),
            )
        )
        print(f"ttedge launch: rank {env['RANK']} of {group.tp}: pid {ranks[-1][1].pid}", file=sys.stderr)
    return _supervise(ranks)


_PR_SET_PDEATHSIG = 1


def _die_with_launcher() -> None:
    """Run in each rank before it starts: on Linux, the kernel sends it SIGTERM when the launcher dies,
    however it dies (a SIGKILL included), so that no rank serves on alone in its own session."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _supervise(ranks: list[tuple[int, subprocess.Popen[bytes]]]) -> int:
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        # The ranks run in their own sessions, so Ctrl-C reaches the launcher alone. Rank 0 gets the signal
        # (it drains its requests, then releases the others); on a machine without rank 0, every rank.
        stopping.append(signum)
        driver = [p for rank, p in ranks if rank == 0]
        for process in driver or [p for _, p in ranks]:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if all(p.poll() is not None for _, p in ranks):
                failed = [p.returncode for _, p in ranks if p.returncode]
                return failed[0] if failed else 0
            failed_ranks = [(rank, p.returncode) for rank, p in ranks if p.poll() not in (None, 0)]
            if failed_ranks:
                rank, code = failed_ranks[0]
                if not stopping:
                    print(
                        f"ttedge launch: rank {rank} exited with code {code}; stopping the other ranks",
                        file=sys.stderr,
                    )
                _stop_all(ranks)
                return code
            if any(rank == 0 and p.poll() == 0 for rank, p in ranks):
                # Rank 0 released the others on its way out; one still here after the grace period is
                # stuck, and is stopped rather than waited for.
                _stop_all(ranks)
                return 0
            time.sleep(_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_all(ranks: list[tuple[int, subprocess.Popen[bytes]]]) -> None:
    """Let the living ranks end within the grace period, then terminate, then kill what is left."""
    deadline = time.monotonic() + _GRACE_S
    for action in ("wait", "terminate", "kill"):
        for _, process in ranks:
            if process.poll() is None and action != "wait":
                getattr(process, action)()
        while time.monotonic() < deadline and any(p.poll() is None for _, p in ranks):
            time.sleep(_POLL_S)
        if all(p.poll() is not None for _, p in ranks):
            return
        deadline = time.monotonic() + _GRACE_S


def run_local_group(world_size: int, rank_main: Callable[..., Any], *args: Any, timeout: float = 3600) -> Any:
    """``rank_main(*args)`` in ``world_size`` spawned processes on this machine, joined through the
    environment rendezvous as ``ttedge launch`` joins them; returns what rank 0's call returns. For
    benchmarks and tests, which want a result back rather than a command run. Fails as soon as a rank
    dies, since the others would wait for it in a collective until the timeout."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    group = CpuGroup(world_size)
    ranks = [
        context.Process(target=_local_rank, args=(env, rank_main, args, results))
        for env in group.environments(free_port())
    ]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result = results.get(timeout=1)
                break
            except queue.Empty:
                dead = [(rank, p.exitcode) for rank, p in enumerate(ranks) if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"the group failed (rank, exit code): {dead or 'timed out'}") from None
    finally:
        for process in ranks:
            process.join(60)
            if process.is_alive():
                process.kill()
    if any(p.exitcode for p in ranks):
        raise RuntimeError(f"ranks exited with codes {[p.exitcode for p in ranks]}")
    return result


def _local_rank(
    env: dict[str, str], rank_main: Callable[..., Any], args: tuple[Any, ...], results: Any
) -> None:
    os.environ.update(env)
    result = rank_main(*args)
    if env["RANK"] == "0":
        results.put(result)


def tt_run_command(
    command: Sequence[str],
    mesh_graph_descriptor: str,
    hosts: Sequence[str],
    mesh: str | None,
    master_port: int = 29500,
    verbose: bool = False,
) -> list[str]:
    """The ``tt-run`` command line that starts ``ttedge COMMAND`` on every host of a multi-host mesh.

    tt-run gives MPI rank 0 to the first host in sorted order; that rank serves, and the others join its
    torch.distributed group (gloo, over the hosts' network) to receive each step
    (runtime/tensor_parallel.py), so the variables naming it travel with mpirun's ``-x``."""
    check_command(command)
    if not hosts:
        raise LaunchError("a multi-host TT launch needs --hosts (comma-separated host names)")
    inner = [sys.executable, "-m", "ttedge.cli", *(["-v"] if verbose else []), *command, "--device", "tt"]
    if mesh is not None:
        inner += ["--mesh", mesh]
    rendezvous = f"-x MASTER_ADDR={sorted(hosts)[0]} -x MASTER_PORT={master_port}"
    return [
        "tt-run",
        "-m",
        mesh_graph_descriptor,
        "--hosts",
        ",".join(hosts),
        "--mpi-args",
        rendezvous,
        *inner,
    ]


def exec_tt_run(argv: list[str]) -> int:
    """Replace this process with ``tt-run``; returns only if it cannot start."""
    if shutil.which(argv[0]) is None:
        raise LaunchError(
            "tt-run (Tenstorrent's multi-host launcher, installed with ttnn) is not on PATH: "
            "install ttnn in this environment or activate the one that has it"
        )
    os.execvp(argv[0], argv)
