"""Ethernet link model: bandwidth per direction of one link, and the latency one collective step pays.

Sources (Tenstorrent's public documentation; see also /work/shared/notes/hardware.md):
- Wormhole: 16 Ethernet cores ("ports") per chip, each a 100 Gb/s-class link, i.e. 12.5 GB/s per
  direction (docs.tenstorrent.com/aibs/wormhole/specifications.html; Wormhole n300 and T3000 product
  pages). The n300's two chips are joined by on-board Ethernet; one of those links is kept for dispatch,
  so collectives get the others (tt-metal tech report "Ethernet and multichip basics").
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
