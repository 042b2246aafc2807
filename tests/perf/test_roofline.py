"""Hardware specs and the roofline arithmetic."""

from __future__ import annotations

import pytest

from ttedge.perf.hardware import BLACKHOLE_P150, CARDS, SYSTEMS, WORMHOLE_N150, host_cpu
from ttedge.perf.roofline import OpCost, place, roofline_seconds


def test_card_specs_are_the_spec_pages() -> None:
    assert WORMHOLE_N150.dram_bytes_per_s == 288e9
    assert WORMHOLE_N150.peak_flops_for("bfloat8_b") == 148e12
    assert BLACKHOLE_P150.dram_bytes_per_s == 512e9
    assert set(CARDS) == {"n150", "n300", "p150"}
    assert set(SYSTEMS) == {*CARDS, "t3k", "galaxy", "p100"}
    for card in CARDS.values():
        assert card.source and card.l1_bytes_per_core == 1.5 * 2**20


def test_narrow_formats_use_the_nearest_listed_peak() -> None:
    assert WORMHOLE_N150.peak_flops_for("bfloat4_b") == WORMHOLE_N150.peak_flops_for("bfloat8_b")
    with pytest.raises(KeyError, match="lists no peak FLOP/s for float64"):
        WORMHOLE_N150.peak_flops_for("float64")


def test_the_lower_roof_is_the_bound() -> None:
    # 288 MB at 288 GB/s is 1 ms; 1 GFLOP at 74 TFLOP/s is far less: memory-bound.
    memory_bound = OpCost(bytes_moved=288_000_000, flops=10**9, data_format="bfloat16")
    assert roofline_seconds(memory_bound, WORMHOLE_N150) == pytest.approx((1e-3, "memory"))
    compute_bound = OpCost(bytes_moved=1, flops=74 * 10**12, data_format="bfloat16")
    assert roofline_seconds(compute_bound, WORMHOLE_N150) == pytest.approx((1.0, "compute"))
    point = place(memory_bound, 2e-3, WORMHOLE_N150)
    assert point.percent_of_roofline == pytest.approx(50.0)
    assert point.achieved_bytes_per_s == pytest.approx(144e9)
    with pytest.raises(ValueError, match="positive"):
        place(memory_bound, 0.0, WORMHOLE_N150)


def test_host_cpu_is_measured() -> None:
    cpu = host_cpu(read_mib=8, matmul_size=128, repeats=2)
    # Anything that runs this suite reads faster than 100 MB/s and multiplies faster than 100 MFLOP/s.
    assert cpu.dram_bytes_per_s > 1e8
    assert set(cpu.peak_flops) == {"float32", "bfloat16", "int8", "int4"}
    assert min(cpu.peak_flops.values()) > 1e8
    assert host_cpu(read_mib=8, matmul_size=128, repeats=2) is cpu  # measured once per process
