"""scripts/bench_collectives.py runs end to end with 2 gloo ranks at tiny sizes: every collective at every
size, sane times, the modelled TT times equal to ``collective_seconds``, the alpha-beta fits, the JSON, the
markdown table and the plot; and its fit recovers known alpha-beta data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.bench_collectives import TT_MESHES, Case, fit_alpha_beta, main
from ttedge.ethernet_mesh.collectives import Collective, collective_seconds
from ttedge.ethernet_mesh.topology import get_mesh

SIZES = [4096, 65536]
# One decode step's residual all-reduce: batch x hidden (576 SmolLM2, 4096 Llama-3.1-8B) x 2 or 4 bytes.
DECODE_BYTES = {b * h * e for b in (1, 32) for h in (576, 4096) for e in (2, 4)}
REPEATS = 3


def test_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "collectives.json", tmp_path / "collectives.png"
    results = main(
        ["--ranks", "2", "--sizes", *map(str, SIZES), "--repeats", str(REPEATS), "--warmup", "1",
         "--json", str(out_json), "--plot", str(out_png)]
    )  # fmt: skip
    rows = results["measurements"]
    for collective in Collective:
        mine = [r for r in rows if r["collective"] == collective.value]
        assert {r["nominal_bytes"] for r in mine if r["label"] == "sweep"} == set(SIZES)
        assert {r["nominal_bytes"] for r in mine if r["label"] != "sweep"} == DECODE_BYTES
        assert len(mine) == len(SIZES) + len(DECODE_BYTES)
    # collective_seconds itself, computed independently of the script (once per size: Galaxy plans are slow).
    expected = {
        (c.value, size): {name: collective_seconds(c, size, get_mesh(name)) for name in TT_MESHES}
        for c in Collective
        for size in {r["nominal_bytes"] for r in rows}
    }
    for r in rows:
        assert r["ranks"] == 2 and len(r["seconds"]) == REPEATS
        assert 0 < r["min_s"] <= r["median_s"] <= r["p90_s"] <= max(r["seconds"]) < 1
        assert r["bytes"] >= r["nominal_bytes"] and r["bytes"] % 2 == 0
        assert r["modelled_s"] == expected[r["collective"], r["nominal_bytes"]]

    fits = {(f["source"], f["collective"]): f for f in results["fits"]}
    for collective in Collective:
        measured = fits["gloo, 2 ranks", collective.value]
        assert measured["points"] == len(SIZES) + 4  # the float32 decode sizes join the sweep
        for name in TT_MESHES:
            # The model is alpha-beta in form: its fit gives back the latency and the bandwidth term.
            mesh, modelled = get_mesh(name), fits[f"model, {name}", collective.value]
            assert modelled["alpha_s"] == pytest.approx(collective_seconds(collective, 0, mesh), rel=1e-6)
            per_byte = collective_seconds(collective, 1e6, mesh) - collective_seconds(collective, 0, mesh)
            assert modelled["beta_s_per_byte"] == pytest.approx(per_byte / 1e6, rel=1e-6)
            assert modelled["max_relative_residual"] < 1e-9

    assert json.loads(out_json.read_text())["measurements"] == rows
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| all-reduce | 512 KiB | float32 | Llama-3.1-8B decode b=32 |" in table
    assert (
        "| model, t3k | all-reduce | 8 | 12.5 |" in table
    )  # 8 ring steps of 1 µs; S/(8 chips x 12.5 GB/s) x 8


def test_fit_recovers_alpha_and_beta() -> None:
    alpha, beta = 40e-6, 1 / 3e9
    sizes = np.geomspace(1e3, 1e8, 12)
    exact = fit_alpha_beta(list(sizes), list(alpha + beta * sizes))
    assert exact.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert exact.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert exact.max_relative_residual < 1e-9
    assert exact.crossover_bytes == pytest.approx(alpha / beta)
    # ±10% multiplicative noise: relative least squares still lands near both constants and says how far.
    noise = 1 + 0.1 * np.random.default_rng(0).uniform(-1, 1, sizes.size)
    noisy = fit_alpha_beta(list(sizes), list((alpha + beta * sizes) * noise))
    assert noisy.alpha_s == pytest.approx(alpha, rel=0.15)
    assert noisy.beta_s_per_byte == pytest.approx(beta, rel=0.15)
    assert 0.01 < noisy.median_relative_residual < noisy.max_relative_residual < 0.2


def test_fit_refuses_what_cannot_be_fitted() -> None:
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_alpha_beta([4096, 4096], [1e-4, 2e-4])
    with pytest.raises(ValueError, match="positive"):
        fit_alpha_beta([4096, 8192], [1e-4, 0.0])
    with pytest.raises(ValueError, match="2 sizes but 1 times"):
        fit_alpha_beta([4096, 8192], [1e-4])


def test_gathered_and_scattered_tensors_split_evenly_over_the_ranks() -> None:
    gathered, reduced = (
        Case("all-gather", "sweep", "float32", 4096),
        Case("all-reduce", "sweep", "float32", 4096),
    )
    assert [gathered.elements(ranks) for ranks in (2, 3, 4)] == [1024, 1026, 1024]
    assert reduced.elements(3) == 1024  # an all-reduce needs no split
    assert Case("reduce-scatter", "decode", "bfloat16", 1152).elements(4) == 576
