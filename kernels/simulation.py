"""Running the kernels in TT-Lang's functional simulator (PyPI ``tt-lang-sim``), in a worker process.

The worker exists because importing the simulator rebinds ``torch.bfloat16`` to ``torch.float32`` for the
whole process (see ``dsl.py``): a test session or a benchmark that ran it in-process would compute every
later bfloat16 tensor in float32. The parent process builds inputs and goldens; the worker imports the
kernel, runs it with the simulator's tracing on and returns the outputs with what the trace says about data
movement: tiles read and written per tensor (from DRAM or L1), tiles through dataflow buffers, and the
dataflow buffers' L1 bytes per node as the simulator accounts them (declared dtypes, so what a card holds).
"""

from __future__ import annotations

import importlib
import re
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from types import TracebackType
from typing import Any

import torch

KERNELS = ("residual_rmsnorm", "swiglu", "rotary", "speculative_acceptance")
# The simulator warns when a node's dataflow buffers exceed its L1 limit, naming their total: with the limit
# at one byte every run reports it.
_L1_WARNING = re.compile(r"DataflowBuffer capacity per node \((\d+) bytes\)")


@dataclass(frozen=True)
class KernelCase:
    """One kernel run: ``inputs`` and ``params`` are the keyword arguments of the kernel module's ``run``."""

    kernel: str
    grid: tuple[int, int]
    inputs: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; the kernels are {', '.join(KERNELS)}")


@dataclass(frozen=True)
class TensorTraffic:
    """One tensor's tiles moved by the kernel's copies, all nodes together."""

    tensor: str
    tiles_read: int
    tiles_written: int
    dram_tiles: int
    l1_tiles: int


@dataclass(frozen=True)
class SimulatorRun:
    outputs: tuple[torch.Tensor, ...]
    traffic: tuple[TensorTraffic, ...]
    # Reservations of dataflow-buffer blocks and the tiles in them, all nodes together.
    dfb_blocks: int
    dfb_tiles: int
    l1_bytes_per_node: int
    nodes: int
    tile_bytes: int
    seconds: float

    @property
    def dram_tiles(self) -> int:
        return sum(t.dram_tiles for t in self.traffic)

    @property
    def dram_bytes(self) -> int:
        return self.dram_tiles * self.tile_bytes


def _simulate(case: KernelCase) -> SimulatorRun:
    """Runs in the worker process: the only place that imports the simulator."""
    from ttl.sim.context import get_context as simulator_context
    from ttl.sim.program import set_max_l1_bytes
    from ttl.sim.trace import set_tracing

    from ttedge.kernels.dsl import SIMULATED, ttnn

    if not SIMULATED:
        raise RuntimeError("tt-lang (the compiler) is installed: kernels run on a card, not simulated")
    kernel = importlib.import_module(f"ttedge.kernels.{case.kernel}")
    context = simulator_context()
    context.trace_events.clear()
    set_tracing(frozenset({"copy", "dfb"}))
    set_max_l1_bytes(1)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kernel.run(**case.inputs, **case.params, grid=case.grid, device=ttnn.open_device(0))
    seconds = time.perf_counter() - started
    l1_bytes = [int(m.group(1)) for w in caught if (m := _L1_WARNING.search(str(w.message)))]
    if not l1_bytes:
        raise RuntimeError("the simulator reported no dataflow-buffer L1 use (did its warning change?)")

    traffic: dict[str, dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(("tiles_read", "tiles_written", "dram_tiles", "l1_tiles"), 0)
    )
    dfb_blocks = dfb_tiles = 0
    for event in context.trace_events:
        data = event.data
        if event.event == "copy_end" and data.get("tensor"):
            moved = traffic[data["tensor"]]
            moved["tiles_read" if data["direction"] == "read" else "tiles_written"] += data["tiles"]
            moved["dram_tiles"] += data.get("dram", 0)
            moved["l1_tiles"] += data.get("local_l1", 0) + data.get("remote_l1", 0)
        elif event.event == "dfb_reserve_end":
            dfb_blocks += 1
            dfb_tiles += data["tiles"]
    context.trace_events.clear()
    outputs = result if isinstance(result, tuple) else (result,)
    return SimulatorRun(
        outputs=tuple(output.clone() for output in outputs),
        traffic=tuple(TensorTraffic(name, **moved) for name, moved in sorted(traffic.items())),
        dfb_blocks=dfb_blocks,
        dfb_tiles=dfb_tiles,
        l1_bytes_per_node=max(l1_bytes),
        nodes=case.grid[0] * case.grid[1],
        tile_bytes=kernel.TILE_BYTES,
        seconds=seconds,
    )


class Simulator:
    """A worker process running kernels in the simulator; use as a context manager."""

    def __init__(self) -> None:
        # spawn, not fork: a forked worker would inherit the parent's torch and threads mid-state.
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))

    def run(self, case: KernelCase) -> SimulatorRun:
        return self._pool.submit(_simulate, case).result()

    def close(self) -> None:
        self._pool.shutdown()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
