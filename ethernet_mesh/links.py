"""Ethernet link model: bandwidth per direction of one link, and the latency one collective step pays.

Sources (Tenstorrent's public documentation):
- Wormhole: 16 Ethernet cores per chip, each driving one link of 100 Gb/s per direction, i.e. 12.5 GB/s
  (docs.tenstorrent.com/aibs/wormhole/specifications.html; tenstorrent/tt-metal
  tech_reports/EthernetMultichip/BasicEthernetGuide.md, "Ethernet Link"). The same report: the n300's two
  chips are joined by two on-board links (200 Gb/s per direction), one of them reserved for the
  dispatcher, so user kernels get 100 Gb/s; the T3000 is four n300s cabled into a 2x4 mesh, each keeping
  that reservation; a Galaxy is a 4x8 mesh whose inner chips use all 16 links.
- Blackhole: 400 Gb/s-class Ethernet links; the p150 exposes 4 QSFP-DD 800G ports
  (docs.tenstorrent.com/aibs/blackhole/specifications.html; Hot Chips 2024, Blackhole). An 800G
  port is modelled as two 400G links, i.e. 2 × 50 GB/s per direction. ASSUMPTION: that split.
- Latency: ASSUMPTION. Tenstorrent publishes no per-hop figure; 1 µs per step stands for one Ethernet
  hop plus the handshake between sender and receiver kernels. Op launch and host dispatch are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

GIGABIT = 1e9 / 8  # bytes per second in one Gb/s
MICROSECOND = 1e-6


@dataclass(frozen=True)
class LinkSpec:
    """One Ethernet link between two chips: full-duplex, so ``bytes_per_s`` flows each way at once."""

    name: str
    bytes_per_s: float  # per direction
    latency_s: float  # paid once per collective step (alpha in the alpha-beta model)
    source: str

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"link {self.name!r}: bandwidth must be positive, got {self.bytes_per_s}")
        if not self.latency_s >= 0:
            raise ValueError(f"link {self.name!r}: latency must not be negative, got {self.latency_s}")


WORMHOLE_ETHERNET = LinkSpec(
    name="wormhole",
    bytes_per_s=100 * GIGABIT,
    latency_s=1 * MICROSECOND,
    source="docs.tenstorrent.com/aibs/wormhole/specifications.html (100 Gb/s-class ports); latency assumed",
)
BLACKHOLE_ETHERNET = LinkSpec(
    name="blackhole",
    bytes_per_s=400 * GIGABIT,
    latency_s=1 * MICROSECOND,
    source="docs.tenstorrent.com/aibs/blackhole/specifications.html (400G-class links); latency assumed",
)
LINK_KINDS = {spec.name: spec for spec in (WORMHOLE_ETHERNET, BLACKHOLE_ETHERNET)}
