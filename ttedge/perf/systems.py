"""What a model can be planned on: one chip's specification, how many chips, and the Ethernet mesh that
joins them (ttedge.ethernet_mesh), or this machine's CPU."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ttedge.ethernet_mesh.topology import BUILT_IN_MESHES, Mesh
from ttedge.perf.hardware import BLACKHOLE_P150, SYSTEMS, HardwareSpec, host_cpu


@dataclass(frozen=True)
class System:
    name: str
    # One chip: tensor parallelism gives each chip its shard of the weights and KV heads.
    chip: HardwareSpec
    chips: int
    # None for one chip (no collectives) and for the CPU.
    mesh: Mesh | None
    is_tenstorrent: bool = True

    def __post_init__(self) -> None:
        if self.mesh is not None and self.mesh.num_chips != self.chips:
            raise ValueError(
                f"{self.name}: mesh {self.mesh.name} has {self.mesh.num_chips} chips, not {self.chips}"
            )


def _tenstorrent_system(name: str, spec: HardwareSpec, chips: int, mesh: str) -> System:
    return System(name, spec.per_chip(), chips, BUILT_IN_MESHES[mesh] if chips > 1 else None)


# Every Tenstorrent system, smallest first within a family: the ladder `smallest_system` climbs. The p150
# boxes are the ethernet_mesh ones (four and eight p150 cards in a ring).
TENSTORRENT_SYSTEMS: Mapping[str, System] = {
    **{name: _tenstorrent_system(name, spec, spec.chips, name) for name, spec in SYSTEMS.items()},
    "p150x4": _tenstorrent_system("p150x4", BLACKHOLE_P150, 4, "p150x4"),
    "p150x8": _tenstorrent_system("p150x8", BLACKHOLE_P150, 8, "p150x8"),
}
FAMILIES: Mapping[str, tuple[str, ...]] = {
    "wormhole": ("n150", "n300", "t3k", "galaxy"),
    "blackhole": ("p100", "p150", "p150x4", "p150x8"),
}
HARDWARE_NAMES = (*TENSTORRENT_SYSTEMS, "cpu")


def cpu_system() -> System:
    """This machine, measured now (host_cpu): one device, no mesh."""
    return System("cpu", host_cpu(), 1, None, is_tenstorrent=False)


def get_system(name: str) -> System:
    if name == "cpu":
        return cpu_system()
    if name not in TENSTORRENT_SYSTEMS:
        raise KeyError(f"unknown hardware {name!r} (have: {', '.join(HARDWARE_NAMES)})")
    return TENSTORRENT_SYSTEMS[name]


def family_of(system: System) -> tuple[str, ...]:
    """The ladder ``system`` is on (every Tenstorrent system is on one)."""
    return next(ladder for ladder in FAMILIES.values() if system.name in ladder)
