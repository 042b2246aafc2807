"""Collective plans over a 1-D group of N devices (a line or a ring) as explicit step lists, and their
alpha-beta cost on a mesh.

The data is split into N equal chunks; chunk k belongs to device k (the k-th chip of the mesh's order).

- all-gather: device k starts with chunk k and ends with all N. Each chunk travels away from its owner
  in both directions at once (links are full-duplex): on a line to both ends; on a ring clockwise for
  ceil((N-1)/2) hops and counter-clockwise for floor((N-1)/2), so ceil((N-1)/2) steps instead of N-1.
- reduce-scatter: every device starts with a full partial tensor and device k ends with the sum of
  everyone's chunk k. It is the all-gather run backwards: each contribution flows towards chunk k's
  owner along the same paths, each device adding its own partial before passing the sum on.
- all-reduce: reduce-scatter then all-gather.

Within one step every directed link carries at most one chunk (the tests check it), so a step costs
``latency + chunk bytes / bandwidth of the slowest link used`` and a plan the sum of its steps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .topology import Mesh


class Collective(enum.Enum):
    ALL_GATHER = "all-gather"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_REDUCE = "all-reduce"


@dataclass(frozen=True)
class Transfer:
    """At ``step`` (from 1), device ``src`` sends what it holds of chunk ``chunk`` to ``dst``: the chunk
    itself in an all-gather, its running sum in a reduce-scatter (the receiver adds its own)."""

    step: int
    src: int
    dst: int
    chunk: int
    reduce: bool


@dataclass(frozen=True)
class CollectivePlan:
    collective: Collective
    devices: int
    ring: bool
    transfers: tuple[Transfer, ...]

    @property
    def steps(self) -> int:
        return max((t.step for t in self.transfers), default=0)

    def seconds(self, total_bytes: float, mesh: Mesh) -> float:
        """Alpha-beta time of the plan on ``mesh`` for a tensor of ``total_bytes`` (the full, gathered or
        reduced, size). Device k of the plan is chip ``mesh.order[k]``."""
        if self.devices != mesh.num_chips:
            raise ValueError(
                f"a plan for {self.devices} devices cannot run on {mesh.name} ({mesh.num_chips} chips)"
            )
        chunk_bytes = total_bytes / self.devices
        # Bytes per directed chip pair per step: chunks sharing a link in one step queue behind each other.
        load: dict[tuple[int, int, int], float] = {}
        for t in self.transfers:
            key = (t.step, mesh.order[t.src], mesh.order[t.dst])
            load[key] = load.get(key, 0.0) + chunk_bytes
        slowest_per_step: dict[int, float] = {}
        for (step, a, b), bytes_sent in load.items():
            bandwidth = mesh.pair_bytes_per_s(a, b)
            if bandwidth == 0:
                raise ValueError(f"{mesh.name}: chips {a} and {b} are not linked")
            slowest_per_step[step] = max(slowest_per_step.get(step, 0.0), bytes_sent / bandwidth)
        return sum(mesh.link.latency_s + seconds for seconds in slowest_per_step.values())


def _hops(devices: int, ring: bool, owner: int) -> tuple[int, int]:
    """How far chunk ``owner`` travels forwards (+1) and backwards (-1) in an all-gather."""
    if ring:
        return devices // 2, (devices - 1) // 2  # ceil((N-1)/2) forwards, floor((N-1)/2) backwards
    return devices - 1 - owner, owner


def _gather_transfers(devices: int, ring: bool, reduce: bool) -> list[Transfer]:
    transfers = []
    for owner in range(devices):
        for direction, hops in zip((1, -1), _hops(devices, ring, owner), strict=True):
            for hop in range(1, hops + 1):
                here = (owner + direction * (hop - 1)) % devices
                there = (owner + direction * hop) % devices
                transfers.append(Transfer(hop, here, there, owner, reduce))
    return transfers


def plan_all_gather(devices: int, ring: bool) -> CollectivePlan:
    _check_devices(devices, ring)
    transfers = _gather_transfers(devices, ring, reduce=False)
    return CollectivePlan(Collective.ALL_GATHER, devices, ring, _in_step_order(transfers))


def plan_reduce_scatter(devices: int, ring: bool) -> CollectivePlan:
    _check_devices(devices, ring)
    gather = _gather_transfers(devices, ring, reduce=True)
    last = max((t.step for t in gather), default=0)
    # Reversed in time and direction: what the all-gather spread out from the owner now converges on it.
    transfers = [Transfer(last + 1 - t.step, t.dst, t.src, t.chunk, reduce=True) for t in gather]
    return CollectivePlan(Collective.REDUCE_SCATTER, devices, ring, _in_step_order(transfers))


def plan_all_reduce(devices: int, ring: bool) -> CollectivePlan:
    scatter = plan_reduce_scatter(devices, ring)
    gather = plan_all_gather(devices, ring)
    shifted = tuple(
        Transfer(t.step + scatter.steps, t.src, t.dst, t.chunk, t.reduce) for t in gather.transfers
    )
    return CollectivePlan(Collective.ALL_REDUCE, devices, ring, scatter.transfers + shifted)


PLANNERS = {
    Collective.ALL_GATHER: plan_all_gather,
    Collective.REDUCE_SCATTER: plan_reduce_scatter,
    Collective.ALL_REDUCE: plan_all_reduce,
}


def plan_on_mesh(collective: Collective, mesh: Mesh) -> CollectivePlan:
    """The plan over all of ``mesh``'s chips, as a ring where its order closes on itself."""
    return PLANNERS[collective](mesh.num_chips, mesh.is_ring)


def collective_seconds(collective: Collective, total_bytes: float, mesh: Mesh) -> float:
    return plan_on_mesh(collective, mesh).seconds(total_bytes, mesh)


def _check_devices(devices: int, ring: bool) -> None:
    if devices < 1:
        raise ValueError(f"a collective needs at least one device, got {devices}")
    if ring and devices < 3:
        raise ValueError(f"a ring needs at least 3 devices, got {devices} (use a line)")


def _in_step_order(transfers: list[Transfer]) -> tuple[Transfer, ...]:
    return tuple(sorted(transfers, key=lambda t: (t.step, t.chunk, t.src)))
