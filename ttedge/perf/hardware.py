"""What each target can do at best: the numbers a measurement is put against as a % of roofline.

Tenstorrent cards come from Tenstorrent's public specification pages (cited per card); the host CPU has no
such page, so it is measured once per process (``host_cpu``): a large read for memory bandwidth, square
matmuls for peak FLOP/s per dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

TERA = 1e12
GIGA = 1e9
MIB = 2**20
KIB = 2**10


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    dram_bytes_per_s: float
    # Peak FLOP/s per data format of the matmul operands (ttnn dtype names on cards, torch's on the CPU).
    peak_flops: Mapping[str, float]
    dram_bytes: int
    # Per Tensix core; 0 on the CPU.
    l1_bytes_per_core: int = 0
    # What TT-Lang leaves of a core's L1 for dataflow (circular) buffers; 0 on the CPU.
    dataflow_buffer_budget_bytes: int = 0
    # Worker cores ttnn computes on, (columns, rows); (0, 0) on the CPU.
    worker_grid: tuple[int, int] = (0, 0)
    source: str = ""
    # Chips the figures above add up (bandwidth, FLOP/s and DRAM are the system's totals); the grid is
    # one chip's.
    chips: int = 1

    def per_chip(self) -> HardwareSpec:
        """One of the system's chips: what a tensor-parallel shard gets."""
        if self.chips == 1:
            return self
        return dataclasses.replace(
            self,
            name=f"one chip of {self.name}",
            dram_bytes_per_s=self.dram_bytes_per_s / self.chips,
            peak_flops={dtype: flops / self.chips for dtype, flops in self.peak_flops.items()},
            dram_bytes=self.dram_bytes // self.chips,
            chips=1,
        )

    def peak_flops_for(self, data_format: str) -> float:
        """The peak for ``data_format``, or for the nearest listed wider format (bfloat4_b weights run at
        no more than the block-float-8 rate the spec pages list)."""
        for candidate in (data_format, *_WIDER_FORMATS.get(data_format, ())):
            if candidate in self.peak_flops:
                return self.peak_flops[candidate]
        listed = ", ".join(self.peak_flops)
        raise KeyError(f"{self.name} lists no peak FLOP/s for {data_format} (it lists {listed})")


_WIDER_FORMATS = {"bfloat4_b": ("bfloat8_b",)}

# tt-lang's DEFAULT_L1_CB_BUDGET_BYTES (ttl/constants.py in the tt-lang and tt-lang-sim wheels): a core's
# 1.5 MB of L1 less what firmware and kernels keep.
_TTLANG_CB_BUDGET = 1432 * KIB

# https://docs.tenstorrent.com/aibs/wormhole/specifications.html (n150s/n150d column): 72 Tensix cores,
# 1.5 MB SRAM each, 12 GB GDDR6 at 288 GB/s; TeraFLOPS FP8 262, FP16 74, BLOCKFP8 148. The worker grid is
# what ttnn computes on (8 x 8 on an n150; tests/tt/mock/n150.yaml).
WORMHOLE_N150 = HardwareSpec(
    name="Wormhole n150",
    dram_bytes_per_s=288 * GIGA,
    peak_flops={"bfloat16": 74 * TERA, "bfloat8_b": 148 * TERA, "fp8": 262 * TERA},
    dram_bytes=12 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(8, 8),
    source="docs.tenstorrent.com/aibs/wormhole/specifications.html",
)
# Same page, n300s/n300d column: two Wormhole chips, 128 Tensix cores, 24 GB at 576 GB/s; FP8 466, FP16 131,
# BLOCKFP8 262. Figures are for the board (both chips); the grid is one chip's.
WORMHOLE_N300 = HardwareSpec(
    name="Wormhole n300",
    dram_bytes_per_s=576 * GIGA,
    peak_flops={"bfloat16": 131 * TERA, "bfloat8_b": 262 * TERA, "fp8": 466 * TERA},
    dram_bytes=24 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(8, 8),
    source="docs.tenstorrent.com/aibs/wormhole/specifications.html",
    chips=2,
)
# TT-LoudBox / TT-QuietBox (T3000): four n300 boards, eight Wormhole chips (tenstorrent/tt-metal
# tech_reports/EthernetMultichip/BasicEthernetGuide.md). Tenstorrent's system pages give the board count, so
# these are four times the n300 column above.
WORMHOLE_T3K = HardwareSpec(
    name="Wormhole T3K",
    dram_bytes_per_s=4 * 576 * GIGA,
    peak_flops={"bfloat16": 4 * 131 * TERA, "bfloat8_b": 4 * 262 * TERA, "fp8": 4 * 466 * TERA},
    dram_bytes=4 * 24 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(8, 8),
    source="4 x the n300 column of docs.tenstorrent.com/aibs/wormhole/specifications.html",
    chips=8,
)
# Galaxy: 32 Wormhole chips in a 4 x 8 mesh (the same tech report). Derived: 32 times one n300 chip (half
# the n300 column), 12 GB at 288 GB/s each.
WORMHOLE_GALAXY = HardwareSpec(
    name="Wormhole Galaxy",
    dram_bytes_per_s=32 * 288 * GIGA,
    peak_flops={"bfloat16": 16 * 131 * TERA, "bfloat8_b": 16 * 262 * TERA, "fp8": 16 * 466 * TERA},
    dram_bytes=32 * 12 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(8, 8),
    source="32 x one n300 chip (docs.tenstorrent.com/aibs/wormhole/specifications.html)",
    chips=32,
)
# https://docs.tenstorrent.com/aibs/blackhole/specifications.html (p150a/p150b): 140 Tensix cores, 1.5 MB
# SRAM each, 32 GB GDDR6 at 512 GB/s. The page lists no FLOP/s; Tenstorrent's Hot Chips 2024 Blackhole talk
# gives 745 TFLOPS 8-bit and 372 TFLOPS 16-bit per chip. (Firmware of 2026 caps p150 boards at 120 active
# Tensix cores; these peaks are the 140-core ones.) The worker grid is tests/tt/mock/p150.yaml's 13 x 10.
BLACKHOLE_P150 = HardwareSpec(
    name="Blackhole p150",
    dram_bytes_per_s=512 * GIGA,
    peak_flops={"bfloat16": 372 * TERA, "bfloat8_b": 745 * TERA, "fp8": 745 * TERA},
    dram_bytes=32 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(13, 10),
    source="docs.tenstorrent.com/aibs/blackhole/specifications.html; Hot Chips 2024 (Blackhole)",
)
# Same page, p100a column: 120 Tensix cores, 28 GB GDDR6 at 448 GB/s. No FLOP/s there either: the p150's
# peaks scaled by 120/140 cores (ASSUMPTION: same clock). No mock cluster for it: the p150's grid less one
# column.
BLACKHOLE_P100 = HardwareSpec(
    name="Blackhole p100",
    dram_bytes_per_s=448 * GIGA,
    peak_flops={dtype: flops * 120 / 140 for dtype, flops in BLACKHOLE_P150.peak_flops.items()},
    dram_bytes=28 * 2**30,
    l1_bytes_per_core=int(1.5 * MIB),
    dataflow_buffer_budget_bytes=_TTLANG_CB_BUDGET,
    worker_grid=(12, 10),
    source="docs.tenstorrent.com/aibs/blackhole/specifications.html; FLOP/s: p150's x 120/140 (assumed)",
)
# The single cards scripts/bench_kernels.py gives per-op floors for.
CARDS: Mapping[str, HardwareSpec] = {"n150": WORMHOLE_N150, "n300": WORMHOLE_N300, "p150": BLACKHOLE_P150}
# Every Tenstorrent system ttedge knows, by the names model cards and `ttedge plan --hardware` use.
SYSTEMS: Mapping[str, HardwareSpec] = {
    **CARDS,
    "t3k": WORMHOLE_T3K,
    "galaxy": WORMHOLE_GALAXY,
    "p100": BLACKHOLE_P100,
}


def _best_seconds(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up: first-touch page faults and kernel selection are not the steady state
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


@functools.cache
def host_cpu(read_mib: int = 256, matmul_size: int = 1024, repeats: int = 5) -> HardwareSpec:
    """This machine's CPU, measured once per process (best of ``repeats``): memory read bandwidth from
    summing ``read_mib`` MiB (a decode step streams weights and KV cache: it reads), peak FLOP/s from
    ``matmul_size``-square matmuls (float32, bfloat16, and the int8 and int4 weight-only kernels), all on
    all of torch's threads. Best-of is the roofline's notion: what
    the machine can do, not what it did on average while shared."""
    import torch

    source = torch.ones(read_mib * MIB // 4, dtype=torch.float32)
    read_seconds = _best_seconds(source.sum, repeats)
    flops = 2 * matmul_size**3
    peak: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.ones(matmul_size, matmul_size, dtype=dtype)
        b = torch.ones(matmul_size, matmul_size, dtype=dtype)
        matmul = functools.partial(torch.matmul, a, b)
        peak[str(dtype).removeprefix("torch.")] = flops / _best_seconds(matmul, repeats)
    # The CPU backend's weight-only kernels (ttedge/models/llama/linear.py) dequantise in their inner loop
    # and reach a small fraction of the bfloat16 (AMX) rate: they have their own roofs.
    activations = torch.ones(matmul_size, matmul_size, dtype=torch.bfloat16)
    int8_weight = torch.ones(matmul_size, matmul_size, dtype=torch.int8)
    row_scales = torch.ones(matmul_size, dtype=torch.bfloat16)
    int8_mm = functools.partial(torch._weight_int8pack_mm, activations, int8_weight, row_scales)
    peak["int8"] = flops / _best_seconds(int8_mm, repeats)
    int4_weight = torch._convert_weight_to_int4pack_for_cpu(
        torch.ones(matmul_size, matmul_size, dtype=torch.int32), 1
    )
    group = 32
    scales_and_zeros = torch.ones(matmul_size // group, matmul_size, 2, dtype=torch.bfloat16)
    int4_mm = functools.partial(
        torch._weight_int4pack_mm_for_cpu, activations, int4_weight, group, scales_and_zeros
    )
    peak["int4"] = flops / _best_seconds(int4_mm, repeats)
    return HardwareSpec(
        name=f"host CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)",
        dram_bytes_per_s=source.nbytes / read_seconds,
        peak_flops=peak,
        dram_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        source=f"measured: {read_mib} MiB read, {matmul_size}^3 matmuls, best of {repeats}",
    )
