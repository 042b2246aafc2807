"""The roofline of one op: the least time its bytes and FLOPs can take on a target, and how close a
measurement came to it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ttedge.perf.hardware import HardwareSpec


@dataclass(frozen=True)
class OpCost:
    """What an op must move and compute at least: each input read once, each output written once."""

    bytes_moved: int
    flops: int
    # The format its FLOPs run in (a key of HardwareSpec.peak_flops, or one ``peak_flops_for`` maps).
    data_format: str


@dataclass(frozen=True)
class CostedOp:
    """An op to time, and what it must move and compute at least."""

    name: str
    run: Callable[[], object]
    cost: OpCost


def time_round_robin(
    ops: Sequence[CostedOp], iterations: int, wait: Callable[[], object] = lambda: None
) -> dict[str, tuple[float, float]]:
    """(fastest, median) seconds per op over ``iterations`` rounds of the ops in turn, after one warm-up
    round (which also builds a device's programs): whatever else loads the machine then hits every op
    alike. ``wait`` runs after each op inside its timing, for a device that queues work (a sync)."""
    for op in ops:
        op.run()
    wait()
    samples: dict[str, list[float]] = {op.name: [] for op in ops}
    for _ in range(iterations):
        for op in ops:
            started = time.perf_counter()
            op.run()
            wait()
            samples[op.name].append(time.perf_counter() - started)
    return {name: (min(times), statistics.median(times)) for name, times in samples.items()}


@dataclass(frozen=True)
class RooflinePoint:
    seconds: float
    achieved_bytes_per_s: float
    achieved_flops: float
    roofline_seconds: float
    # "memory" or "compute": which roof is the lower bound.
    bound: str

    @property
    def percent_of_roofline(self) -> float:
        """100 at the roofline. Above 100 means the op beat the DRAM roof: its data stayed in caches."""
        return 100.0 * self.roofline_seconds / self.seconds


def roofline_seconds(cost: OpCost, spec: HardwareSpec) -> tuple[float, str]:
    memory = cost.bytes_moved / spec.dram_bytes_per_s
    compute = cost.flops / spec.peak_flops_for(cost.data_format)
    return (memory, "memory") if memory >= compute else (compute, "compute")


def place(cost: OpCost, seconds: float, spec: HardwareSpec) -> RooflinePoint:
    """A measured ``seconds`` for ``cost`` against ``spec``'s roofline."""
    if seconds <= 0:
        raise ValueError(f"a measured time must be positive, got {seconds}")
    bound_seconds, bound = roofline_seconds(cost, spec)
    return RooflinePoint(
        seconds=seconds,
        achieved_bytes_per_s=cost.bytes_moved / seconds,
        achieved_flops=cost.flops / seconds,
        roofline_seconds=bound_seconds,
        bound=bound,
    )
