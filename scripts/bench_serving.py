"""Serving throughput against latency: a concurrency sweep of streaming clients against a ttedge server.

At each concurrency level C, C clients each stream chat completions back to back (a closed loop) until
the level's requests are done. Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``),
so levels compare the same work. Per level it reports time to first token (arrival of the first content
chunk), tokens/s per user (a stream's decode rate after its first token), aggregate tokens/s (all
completion tokens over the level's wall time) and end-to-end latency. Prints a markdown table, writes
JSON and a PNG of the trade-off (aggregate against per-user tokens/s, one point per level).

    python scripts/bench_serving.py --json out/bench_serving.json --plot out/bench_serving.png
    python scripts/bench_serving.py --url http://127.0.0.1:8000/v1      # against a running server

Without ``--url`` it starts ``ttedge serve`` itself (``--weights``, ``--max-num-seqs``, ``--model``)
and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

# Short, varied user turns; the chat template makes each prompt about 30-40 tokens.
PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a child.",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of a heist film you invent.",
    "How do vaccines train the immune system?",
]


@dataclass
class RequestTiming:
    start: float
    first_token: float
    end: float
    completion_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def decode_tps(self) -> float:
        span = self.end - self.first_token
        return (self.completion_tokens - 1) / span if self.completion_tokens > 1 and span > 0 else 0.0


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ttft_p50_s: float
    ttft_p99_s: float
    per_user_tps: float  # median over requests
    aggregate_tps: float
    latency_p50_s: float
    wall_s: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def stream_one(
    client: httpx.AsyncClient, api: str, model: str, prompt: str, max_tokens: int
) -> RequestTiming:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first_token = None
    completion_tokens = 0
    async with client.stream("POST", f"{api}/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"server answered {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(f"stream failed: {event['error']}")
            if event.get("choices") and event["choices"][0]["delta"].get("content") and first_token is None:
                first_token = time.perf_counter()
            if event.get("usage"):
                completion_tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestTiming(start, first_token or end, end, completion_tokens)


async def run_level(api: str, model: str, concurrency: int, requests: int, max_tokens: int) -> LevelResult:
    timings: list[RequestTiming] = []
    issued = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            prompt = PROMPTS[issued % len(PROMPTS)]
            issued += 1
            timings.append(await stream_one(client, api, model, prompt, max_tokens))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = [t.ttft for t in timings]
    return LevelResult(
        concurrency=concurrency,
        requests=len(timings),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        per_user_tps=statistics.median(t.decode_tps for t in timings),
        aggregate_tps=sum(t.completion_tokens for t in timings) / wall,
        latency_p50_s=percentile([t.end - t.start for t in timings], 50),
        wall_s=wall,
    )


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable, "-m", "ttedge.cli", "serve", "--port", "0",
        "--weights", args.weights, "--max-num-seqs", str(args.max_num_seqs),
        "--max-queue", str(max(args.concurrency)), "--kv-cache-mb", str(args.kv_cache_mb),
    ]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    for line in server.stdout:  # "ttedge: serving <model> (...) at http://HOST:PORT/v1"
        if line.startswith("ttedge: serving"):
            return server, line.rsplit(" at ", 1)[1].strip()
    raise SystemExit(f"ttedge serve exited with status {server.wait()} before serving")


def table(results: list[LevelResult]) -> str:
    rows = [
        "| concurrency | requests | TTFT p50 s | TTFT p99 s | tok/s per user | aggregate tok/s "
        "| latency p50 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.concurrency} | {r.requests} | {r.ttft_p50_s:.2f} | {r.ttft_p99_s:.2f} | "
            f"{r.per_user_tps:.1f} | {r.aggregate_tps:.1f} | {r.latency_p50_s:.1f} |"
        )
    return "\n".join(rows)


def plot(results: list[LevelResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (trade_off, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    users = [r.per_user_tps for r in results]
    aggregate = [r.aggregate_tps for r in results]
    trade_off.plot(users, aggregate, marker="o")
    for r in results:
        trade_off.annotate(f"{r.concurrency}", (r.per_user_tps, r.aggregate_tps), textcoords="offset points",
                           xytext=(4, 4))  # fmt: skip
    trade_off.set_xlabel("tokens/s per user")
    trade_off.set_ylabel("aggregate tokens/s")
    trade_off.set_title("throughput against per-user speed (labels: concurrency)")
    trade_off.grid(alpha=0.3)
    levels = [r.concurrency for r in results]
    ttft.plot(levels, [r.ttft_p50_s for r in results], marker="o", label="p50")
    ttft.plot(levels, [r.ttft_p99_s for r in results], marker="s", label="p99")
    ttft.set_xscale("log", base=2)
    ttft.set_xlabel("concurrent streams")
    ttft.set_ylabel("time to first token, s")
    ttft.set_title("time to first token")
    ttft.legend()
    ttft.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def sweep(args: argparse.Namespace, api: str) -> tuple[str, list[LevelResult]]:
    async with httpx.AsyncClient(timeout=30) as client:
        model = (await client.get(f"{api}/models")).json()["data"][0]["id"]
        await stream_one(client, api, model, PROMPTS[0], 8)  # warm-up: first-call allocations
    results = []
    for concurrency in args.concurrency:
        requests = max(args.min_requests, args.rounds * concurrency)
        result = await run_level(api, model, concurrency, requests, args.max_tokens)
        print(
            f"concurrency {concurrency}: {result.aggregate_tps:.1f} agg tok/s, {result.per_user_tps:.1f} "
            f"tok/s/user, TTFT p50 {result.ttft_p50_s:.2f} s ({result.requests} requests, "
            f"{result.wall_s:.0f} s)",
            file=sys.stderr,
        )
        results.append(result)
    return model, results


def main(argv: list[str] | None = None) -> list[LevelResult]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server's API base, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=6, help="at least this many per level")
    parser.add_argument("--model", help="started server: model (default: the embedded SmolLM2)")
    parser.add_argument("--weights", default="auto", help="started server: CPU weight format")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="started server: running batch")
    parser.add_argument("--kv-cache-mb", type=int, default=512, help="started server: KV cache size")
    parser.add_argument("--threads", type=int, help="started server: torch threads (default: all cores)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path, help="PNG of the throughput/latency trade-off")
    args = parser.parse_args(argv)

    server = None
    api = args.url
    if api is None:
        server, api = start_server(args)
    try:
        model, results = asyncio.run(sweep(args, api.rstrip("/")))
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        payload = {"model": model, "settings": config, "levels": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.plot:
        plot(results, args.plot, f"ttedge serving: {model}, {args.max_tokens} tokens per request")
    return results


if __name__ == "__main__":
    main()
