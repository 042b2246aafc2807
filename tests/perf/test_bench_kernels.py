"""scripts/bench_kernels.py runs end to end at small sizes: every op of the layer per format, the roofline
columns, the simulator's data-movement report, the TT status, and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench_kernels import main

LAYER_OPS = [
    "attn_norm", "qkv", "rope_qk", "attention", "o", "attn_residual",
    "mlp_norm", "gate_up", "swiglu", "down", "mlp_residual",
]  # fmt: skip


def test_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    results = main(
        ["--formats", "float32", "int4", "--rows", "1", "4", "--context", "32", "--iterations", "2",
         "--layer-copies", "2", "--sim-grid", "1", "2", "--json", str(out)]
    )  # fmt: skip
    for fmt in ("float32", "int4"):
        for rows in (1, 4):
            ops = [t for t in results["cpu"] if t["weight_format"] == fmt and t["rows"] == rows]
            assert [t["op"] for t in ops] == LAYER_OPS
            for t in ops:
                assert t["seconds"] > 0 and t["bytes_moved"] > 0 and t["flops"] > 0
                assert t["percent_of_roofline"] > 0 and t["bound"] in ("memory", "compute")
    qkv = {t["weight_format"]: t for t in results["cpu"] if t["op"] == "qkv" and t["rows"] == 1}
    assert qkv["int4"]["bytes_moved"] < qkv["float32"]["bytes_moved"] / 4  # int4 reads ~1/7 of the bytes
    reports = {r["kernel"]: r for r in results["simulator"]}
    assert set(reports) == {"residual_rmsnorm", "swiglu", "rotary", "speculative_acceptance"}
    # SmolLM2: 32 rows x 1536 of gate and of up read, as much written, in 2 KiB bfloat16 tiles.
    assert reports["swiglu"]["dram_tiles"] == 3 * 48
    assert reports["swiglu"]["dram_bytes"] == 3 * 48 * 2048
    assert reports["swiglu"]["dram_roofline_us"]["n150"] == pytest.approx(3 * 48 * 2048 / 288e3)
    assert results["tt"].startswith("skipped: ") and results["tt_ops"] == []
    assert results["layer_copies"] == 2
    assert json.loads(out.read_text())["cpu"] == results["cpu"]
