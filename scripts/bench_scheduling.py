"""Scheduling policies side by side: a mixed-length workload through the real engine and model.

    nice python scripts/bench_scheduling.py [--requests 48] [--kv-mb 256 24] [--arrivals burst poisson]
        [--reps 2] [--json bench_scheduling.json]

The workload is the held-out split of ``train_length_predictor.py``'s prompt set (never seen by the
regressor), shuffled so short and long answers interleave, as chat prompts with greedy decoding and
max 256 tokens. Every policy gets the same prompts, the same model, the same KV budget and the same
``max_num_seqs``; policies run round-robin within each repetition, so load from other processes on
the machine hits them alike, and each result is also given as a ratio to FCFS in the same repetition.

Policies: ``fcfs``; ``length-aware`` with the trained predictor; and, to show where the difference
comes from, length-aware with exact lengths (``oracle``: the greedy lengths of the FCFS run), with
only its admission order (``order-only``) and with only its KV reservation (``reserve-only``).

Per run: output tokens/s, requests/s, end-to-end latency and time to first token (p50, p99, mean),
preemptions, tokens recomputed because of them, the mean number of sequences per step, and the
predictor's MAE on the workload. The JSON holds every run; a markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_length_predictor import build_prompts, split

from ttedge.bootstrap import load_engine
from ttedge.config import EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.policies import FcfsPolicy, LengthAwarePolicy, SchedulingPolicy
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import LengthPredictFn, SchedulerConfig
from ttedge.engine.sequence import Sequence
from ttedge.runtime.cpu import CpuModelRunner

MAX_TOKENS = 256


@dataclass
class Record:
    arrival: float
    prompt_tokens: int
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    predicted: int | None = None


@dataclass
class RunResult:
    policy: str
    regime: str
    arrivals: str
    rep: int
    seconds: float  # on the chosen clock
    wall_seconds: float
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_p50: float
    latency_p99: float
    latency_mean: float
    ttft_p50: float
    ttft_p99: float
    ttft_mean: float
    preemptions: int
    recomputed_tokens: int
    mean_batch: float  # sequences per step
    steps: int
    predict_seconds: float
    predictor_mae: float | None
    outputs_digest: str  # of every request's output tokens: equal digests, identical outputs
    lengths: list[int] = field(repr=False)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


class Clock:
    """Seconds since the run started, on one of two timelines. ``wall``: real time, right on a quiet
    machine. ``cpu``: this process's CPU time plus the idle gaps between arrivals, i.e. the timeline the
    run would have alone on the machine; with one thread it is barely moved by other processes, so
    runs compare fairly on a shared machine."""

    def __init__(self, kind: str):
        self.kind = kind
        self._read = time.process_time if kind == "cpu" else time.monotonic
        self._start = self._read()
        self._skipped = 0.0

    def __call__(self) -> float:
        return self._read() - self._start + self._skipped

    def wait_until(self, t: float) -> None:
        gap = t - self()
        if gap <= 0:
            return
        if self.kind == "cpu":
            self._skipped += gap
        else:
            time.sleep(gap)


def run_workload(
    engine: Engine,
    prompts: list[list[int]],
    arrivals: list[float],
    clock_kind: str,
    label: tuple[str, str, str, int],
) -> RunResult:
    """Feed requests at their arrival times (seconds from the start) and step the engine to the end."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    records: dict[str, Record] = {}
    seqs: dict[str, Sequence] = {}
    computed = steps = batch_total = 0
    clock = Clock(clock_kind)
    engine.scheduler.clock = clock  # waiting times for aging on the same timeline
    wall_start = time.monotonic()
    while order or engine.has_unfinished():
        now = clock()
        while order and arrivals[order[0]] <= now:
            i = order.pop(0)
            rid = f"r{i}"
            seqs[rid] = engine.add_request(prompts[i], params, request_id=rid)
            seqs[rid].arrival_time = arrivals[i]
            records[rid] = Record(arrival=arrivals[i], prompt_tokens=len(prompts[i]))
        if not engine.has_unfinished():
            clock.wait_until(arrivals[order[0]])
            continue
        chunks = engine.scheduler.schedule()
        computed += sum(c.num_tokens for c in chunks)
        steps += 1
        batch_total += len(chunks)
        outputs = engine.execute(chunks)
        now = clock()
        for out in outputs:
            record = records[out.request_id]
            if record.first_token is None:
                record.first_token = now
            if out.finished:
                record.finished = now
                record.output_tokens = out.num_output_tokens
    seconds = clock()
    for rid, seq in seqs.items():
        records[rid].predicted = seq.predicted_output_len
    done = list(records.values())
    latencies = [r.finished - r.arrival for r in done if r.finished is not None]
    ttfts = [r.first_token - r.arrival for r in done if r.first_token is not None]
    output_tokens = sum(r.output_tokens for r in done)
    # Without preemption every prompt token and every output token but the last is computed once.
    needed = sum(r.prompt_tokens + r.output_tokens - 1 for r in done)
    predicted = [(r.predicted, r.output_tokens) for r in done if r.predicted is not None]
    policy, regime, arrival_kind, rep = label
    return RunResult(
        policy=policy,
        regime=regime,
        arrivals=arrival_kind,
        rep=rep,
        seconds=seconds,
        wall_seconds=time.monotonic() - wall_start,
        output_tokens=output_tokens,
        tokens_per_s=output_tokens / seconds,
        requests_per_s=len(done) / seconds,
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        latency_mean=statistics.fmean(latencies),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        ttft_mean=statistics.fmean(ttfts),
        preemptions=engine.scheduler.num_preemptions,
        recomputed_tokens=computed - needed,
        mean_batch=batch_total / max(1, steps),
        steps=steps,
        predict_seconds=0.0,
        predictor_mae=statistics.fmean(abs(p - n) for p, n in predicted) if predicted else None,
        outputs_digest=hashlib.sha256(
            json.dumps([seqs[f"r{i}"].output_ids for i in range(len(prompts))]).encode()
        ).hexdigest()[:16],
        lengths=[records[f"r{i}"].output_tokens for i in range(len(prompts))],
    )


@dataclass(frozen=True)
class Variant:
    name: str
    policy: Callable[[float], SchedulingPolicy]
    oracle: bool = False  # plan with the true greedy lengths instead of the predictor's


VARIANTS = {
    v.name: v
    for v in (
        Variant("fcfs", lambda wait: FcfsPolicy()),
        Variant("length-aware", lambda wait: LengthAwarePolicy(wait)),
        Variant("oracle", lambda wait: LengthAwarePolicy(wait), oracle=True),
        Variant("order-only", lambda wait: LengthAwarePolicy(wait, reserve=False)),
        Variant("reserve-only", lambda wait: LengthAwarePolicy(wait, order_by_length=False)),
    )
}


def timed(predict: LengthPredictFn, spent: list[float]) -> LengthPredictFn:
    def wrapper(seq: Sequence) -> int:
        started = time.perf_counter()
        try:
            return predict(seq)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper


def arrival_times(kind: str, count: int, rate: float, rng: random.Random) -> list[float]:
    if kind == "burst":
        return [0.0] * count
    gaps = [rng.expovariate(rate) for _ in range(count)]
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]


def summarise(results: list[RunResult]) -> list[dict[str, object]]:
    """Median over repetitions per (regime, arrivals, policy), with ratios to FCFS of the same repetition."""
    rows = []
    keys = sorted({(r.regime, r.arrivals) for r in results})
    for regime, arrivals in keys:
        group = [r for r in results if (r.regime, r.arrivals) == (regime, arrivals)]
        fcfs = {r.rep: r for r in group if r.policy == "fcfs"}
        for policy in dict.fromkeys(r.policy for r in group):
            runs = [r for r in group if r.policy == policy]

            def med(attr: str, runs: list[RunResult] = runs) -> float:
                return statistics.median(getattr(r, attr) for r in runs)

            ratio = statistics.median(
                r.tokens_per_s / fcfs[r.rep].tokens_per_s for r in runs if r.rep in fcfs
            )
            latency_ratio = statistics.median(
                r.latency_mean / fcfs[r.rep].latency_mean for r in runs if r.rep in fcfs
            )
            maes = [r.predictor_mae for r in runs if r.predictor_mae is not None]
            rows.append(
                {
                    "regime": regime,
                    "arrivals": arrivals,
                    "policy": policy,
                    "tokens_per_s": med("tokens_per_s"),
                    "throughput_vs_fcfs": ratio,
                    "requests_per_s": med("requests_per_s"),
                    "latency_p50": med("latency_p50"),
                    "latency_p99": med("latency_p99"),
                    "latency_mean": med("latency_mean"),
                    "mean_latency_vs_fcfs": latency_ratio,
                    "ttft_p50": med("ttft_p50"),
                    "ttft_p99": med("ttft_p99"),
                    "preemptions": med("preemptions"),
                    "recomputed_tokens": med("recomputed_tokens"),
                    "mean_batch": med("mean_batch"),
                    "predictor_mae": statistics.median(maes) if maes else None,
                }
            )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| KV budget | arrivals | policy | tok/s | × FCFS | req/s | latency p50 / p99 / mean (s) | "
        "mean × FCFS | TTFT p50 / p99 (s) | preempt. | recomputed tok | seqs/step | MAE (tok) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mae = "" if r["predictor_mae"] is None else f"{r['predictor_mae']:.0f}"
        lines.append(
            f"| {r['regime']} | {r['arrivals']} | {r['policy']} | {r['tokens_per_s']:.1f} | "
            f"{r['throughput_vs_fcfs']:.2f} | {r['requests_per_s']:.2f} | {r['latency_p50']:.0f} / "
            f"{r['latency_p99']:.0f} / {r['latency_mean']:.0f} | {r['mean_latency_vs_fcfs']:.2f} | "
            f"{r['ttft_p50']:.1f} / {r['ttft_p99']:.1f} | {r['preemptions']:.0f} | "
            f"{r['recomputed_tokens']:.0f} | {r['mean_batch']:.1f} | {mae} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--kv-mb", type=float, nargs="+", default=[256.0, 24.0], help="KV budgets to compare")
    parser.add_argument("--arrivals", nargs="+", choices=["burst", "poisson"], default=["burst"])
    parser.add_argument(
        "--load", type=float, default=0.9, help="poisson rate as a fraction of FCFS's burst requests/s"
    )
    parser.add_argument("--policies", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-wait-s", type=float, default=SchedulerConfig.max_wait_s)
    parser.add_argument("--weights", default="int4", help="CPU weight format (float32 is batch-invariant)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps the cpu clock fair)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="see Clock")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.policies[0] != "fcfs":
        raise SystemExit(
            "list fcfs first: it is the baseline of every ratio and gives the oracle its lengths"
        )
    if "poisson" in args.arrivals and args.arrivals[0] != "burst":
        raise SystemExit("poisson arrivals are paced by the burst rate: list burst first")

    loaded = load_engine(EngineSettings(weight_format=args.weights, kv_cache_mb=1, threads=args.threads))
    base = loaded.engine
    assert isinstance(base.runner, CpuModelRunner)
    model = base.runner.model
    prompts_all = build_prompts()
    _, test = split(len(prompts_all))
    chosen = random.Random(args.seed).sample(test, min(args.requests, len(test)))
    prompts = [
        loaded.tokenizer.encode_chat([{"role": "user", "content": prompts_all[i].text}]) for i in chosen
    ]
    print(
        f"{len(prompts)} held-out prompts, {sum(map(len, prompts))} prompt tokens, {args.weights} weights, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, max_num_seqs {args.max_num_seqs}",
        file=sys.stderr,
    )

    results: list[RunResult] = []
    for kv_mb in args.kv_mb:
        runner = CpuModelRunner(model, int(kv_mb * 2**20))
        regime = f"{kv_mb:g} MB ({runner.allocator.num_blocks} blocks)"
        for arrival_kind in args.arrivals:
            for rep in range(args.reps):
                rate = 0.0
                if arrival_kind == "poisson":
                    burst = [r for r in results if r.regime == regime and r.arrivals == "burst"]
                    rate = args.load * statistics.median(
                        r.requests_per_s for r in burst if r.policy == "fcfs"
                    )
                arrivals = arrival_times(arrival_kind, len(prompts), rate, random.Random(args.seed + rep))
                true_lengths: dict[str, int] = {}
                for name in args.policies:
                    variant = VARIANTS[name]
                    config = SchedulerConfig(
                        max_num_seqs=args.max_num_seqs,
                        max_wait_s=args.max_wait_s,
                        policy=variant.policy(args.max_wait_s).name,
                    )
                    engine = Engine(runner, base.text_stream_factory, tuple(base.eos_token_ids), config)
                    scheduler = engine.scheduler
                    scheduler.policy = variant.policy(args.max_wait_s)
                    if variant.oracle:
                        scheduler.predict_length = lambda seq, lengths=true_lengths: lengths[seq.request_id]
                    spent = [0.0]
                    if scheduler.predict_length is not None:
                        scheduler.predict_length = timed(scheduler.predict_length, spent)
                    result = run_workload(
                        engine, prompts, arrivals, args.clock, (name, regime, arrival_kind, rep)
                    )
                    result.predict_seconds = spent[0]
                    results.append(result)
                    if name == "fcfs":
                        true_lengths.update({f"r{i}": n for i, n in enumerate(result.lengths)})
                    print(
                        f"{regime} {arrival_kind} rep {rep} {name}: {result.tokens_per_s:.1f} tok/s "
                        f"({result.output_tokens} tokens, {result.wall_seconds:.0f} s wall), "
                        f"mean latency {result.latency_mean:.1f} s, {result.preemptions} preemptions, "
                        f"outputs {result.outputs_digest}",
                        file=sys.stderr,
                    )
    rows = summarise(results)
    digests = {r.outputs_digest for r in results}
    print(markdown(rows))
    same = "yes" if len(digests) == 1 else f"no, {len(digests)} different sets"
    print(f"\noutputs identical across all runs: {same}")
    if args.json:
        report = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "requests": len(prompts),
            "threads": torch.get_num_threads(),
            "summary": rows,
            "runs": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
