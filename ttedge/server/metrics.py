"""Prometheus metrics of the server, in a registry of its own (several apps may share a process in tests).

Throughput is left to the counters: ``rate(ttedge_generation_tokens_total[1m])`` is exact over any
window a dashboard picks, where a server-side tokens/s gauge would be averaged over a window the
scraper cannot see and aliased by the scrape interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ttedge.engine.engine import EngineStats
from ttedge.server.async_engine import TimedOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    content_type = "text/plain; version=0.0.4; charset=utf-8"  # the format generate_latest writes

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.time_to_first_token = Histogram(
            "ttedge_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "ttedge_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request",
            buckets=_TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "ttedge_e2e_request_latency_seconds",
            "From a request's arrival to its end",
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "ttedge_prompt_tokens", "Prompt tokens of admitted requests", registry=registry
        )
        self.generation_tokens = Counter("ttedge_generation_tokens", "Generated tokens", registry=registry)
        self.finished = Counter(
            "ttedge_requests_finished",
            "Admitted requests by how they ended (stop, length, abort = client gone, error)",
            ["finish_reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "ttedge_requests_rejected",
            "Requests refused before generation, by error code",
            ["reason"],
            registry=registry,
        )
        registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Times one admitted request's tokens and records how it ended, exactly once."""

    def __init__(self, metrics: Metrics, arrival: float, num_prompt_tokens: int):
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None
        self._done = False
        metrics.prompt_tokens.inc(num_prompt_tokens)

    def observe(self, timed: TimedOutput) -> None:
        count = len(timed.output.new_token_ids)
        self._metrics.generation_tokens.inc(count)
        if self._last is None:
            self._metrics.time_to_first_token.observe(timed.time - self._arrival)
        elif count:
            # A step may yield several tokens at once (speculative decoding): spread the gap over them.
            for _ in range(count):
                self._metrics.inter_token_latency.observe((timed.time - self._last) / count)
        self._last = timed.time

    def finish(self, reason: str) -> None:
        if not self._done:
            self._done = True
            self._metrics.e2e_latency.observe(time.monotonic() - self._arrival)
            self._metrics.finished.labels(reason).inc()


class _EngineCollector:
    """Engine gauges read at scrape time from the engine thread's latest snapshot."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self._engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._engine_stats()
        yield GaugeMetricFamily(
            "ttedge_requests_waiting", "Requests queued for a batch slot", stats.num_waiting
        )
        yield GaugeMetricFamily("ttedge_requests_running", "Running batch size", stats.num_running)
        yield GaugeMetricFamily("ttedge_kv_cache_blocks_used", "KV cache blocks in use", stats.kv_blocks_used)
        yield GaugeMetricFamily(
            "ttedge_kv_cache_blocks_total", "KV cache blocks in all", stats.kv_blocks_total
        )
        collab = stats.collab
        yield CounterMetricFamily(
            "ttedge_spec_draft_tokens", "Draft tokens verified by the big model", collab.draft_tokens
        )
        yield CounterMetricFamily(
            "ttedge_spec_accepted_tokens", "Draft tokens the big model accepted", collab.accepted_draft_tokens
        )
        yield CounterMetricFamily(
            "ttedge_bild_fallbacks",
            "BiLD drafts cut short by the small model's low confidence",
            collab.fallbacks,
        )
        yield CounterMetricFamily(
            "ttedge_bild_rollbacks", "BiLD drafts the big model overruled", collab.rollbacks
        )
        routed = CounterMetricFamily(
            "ttedge_routed_requests", "Routed requests by the model that answered", labels=["model"]
        )
        routed.add_metric(["small"], collab.routed_small)
        routed.add_metric(["big"], collab.routed_big)
        yield routed
        yield CounterMetricFamily(
            "ttedge_small_model_tokens",
            "Tokens the small model wrote alone (guided, routed)",
            collab.small_model_tokens,
        )
