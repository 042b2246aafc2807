"""scripts/bench_serving.py end to end against a live server: it measures what its table says."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.bench_serving import main
from tests.server.live import LiveServer


def test_sweep_reports_every_level_and_draws_the_plot(server: LiveServer, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "serving.json", tmp_path / "serving.png"
    results = main(
        ["--url", server.api, "--concurrency", "1", "3", "--max-tokens", "5", "--rounds", "2",
         "--min-requests", "2", "--json", str(out_json), "--plot", str(out_png)]
    )  # fmt: skip
    assert [r.concurrency for r in results] == [1, 3]
    assert [r.requests for r in results] == [2, 6]
    for r in results:
        assert 0 < r.ttft_p50_s <= r.ttft_p99_s <= r.latency_p50_s * 10
        assert r.aggregate_tps > 0 and r.per_user_tps > 0
    # Every request streamed exactly max_tokens tokens (ignore_eos): aggregate = tokens / wall.
    for r in results:
        assert abs(r.aggregate_tps * r.wall_s - 5 * r.requests) < 1e-6 * r.requests
    saved = json.loads(out_json.read_text())
    assert [level["concurrency"] for level in saved["levels"]] == [1, 3]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    server.wait_engine_idle()
