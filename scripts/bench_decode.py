"""Prefill and decode speed and peak memory of the CPU backend, per weight format.

Each format runs in its own child process, so peak RSS is that format's alone. Decode runs the real
model greedily (argmax fed back) through the runner with B sequences at once, measuring steady-state
steps after a warm-up. Prints a markdown table and writes JSON.

    python scripts/bench_decode.py --formats float32 bfloat16 int8 int4 auto --json out/bench_decode.json

A format suffixed ``:invariant`` (``int4:invariant``) runs the batch-invariant mode: the cost of outputs
that do not depend on the batch (docs/speculative.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

# The machine reads about this many bytes per second from DRAM with torch on 2 threads
# (see docs/benchmarks.md); batch-1 decode cannot beat bandwidth / bytes read per token.
DRAM_BYTES_PER_SECOND = 21.8e9


def measure(weight_format: str, model: str | None, batches: list[int], prompt_len: int, steps: int) -> dict:
    import torch

    from ttedge.checkpoint import load_checkpoint
    from ttedge.checkpoint.discovery import resolve_model
    from ttedge.models.llama.reference import LlamaModel
    from ttedge.runtime.base import StepInput
    from ttedge.runtime.cpu import CpuModelRunner

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = load_checkpoint(resolve_model(model))
    started = time.perf_counter()
    base_format, _, mode = weight_format.partition(":")
    if mode not in ("", "invariant"):
        raise SystemExit(f"unknown mode {mode!r} in {weight_format!r}; the one mode is :invariant")
    llama = LlamaModel.from_checkpoint(checkpoint, base_format, batch_invariant=mode == "invariant")
    load_seconds = time.perf_counter() - started
    max_batch = max(batches)
    kv_tokens = max_batch * (prompt_len + steps + 8)
    spec_bytes = 2 * llama.config.num_layers * llama.config.kv_size * llama.dtype.itemsize
    runner = CpuModelRunner(llama, kv_cache_bytes=(kv_tokens + 64 * max_batch) * spec_bytes)
    vocab = llama.config.vocab_size
    prompt = torch.randint(100, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def new_table(tokens: int) -> list[int]:
        table: list[int] = []
        runner.allocator.grow_table(table, tokens)
        return table

    # Prefill: one prompt, timed over repeats after a warm-up.
    prefill_times = []
    for _ in range(4):
        table = new_table(prompt_len)
        t0 = time.perf_counter()
        runner.run([StepInput(prompt, 0, table)])
        prefill_times.append(time.perf_counter() - t0)
        runner.allocator.free(table)
    prefill_tps = prompt_len / statistics.median(prefill_times[1:])

    decode = {}
    for batch in batches:
        tables = [new_table(prompt_len + steps + 1) for _ in range(batch)]
        logits = runner.run([StepInput(prompt, 0, t) for t in tables])
        tokens = [int(row.argmax()) for row in logits]
        step_times = []
        for step in range(steps):
            inputs = [StepInput([tok], prompt_len + step, t) for tok, t in zip(tokens, tables, strict=True)]
            t0 = time.perf_counter()
            logits = runner.run(inputs)
            tokens = [int(row.argmax()) for row in logits]
            step_times.append(time.perf_counter() - t0)
        for t in tables:
            runner.allocator.free(t)
        step = statistics.median(step_times[2:])
        decode[batch] = {"per_user_tps": 1 / step, "aggregate_tps": batch / step, "step_ms": step * 1e3}

    weight_bytes = (
        sum(lin.nbytes for layer in llama.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        + llama.lm_head.nbytes
    )
    # Bytes one batch-1 decode step must read: every weight once, plus one embedding row.
    bytes_per_token = weight_bytes + llama.embed[0].nbytes
    return {
        "format": weight_format,
        "model": checkpoint.path.name,
        "load_seconds": round(load_seconds, 2),
        "prefill_tokens": prompt_len,
        "prefill_tps": round(prefill_tps, 1),
        "decode": {b: {k: round(v, 2) for k, v in d.items()} for b, d in decode.items()},
        "weight_bytes": weight_bytes,
        "roofline_batch1_tps": round(DRAM_BYTES_PER_SECOND / bytes_per_token, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _child(queue: mp.Queue, *args: object) -> None:
    queue.put(measure(*args))  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--formats", nargs="+", default=["float32", "bfloat16", "int8", "int4", "auto"])
    parser.add_argument("--model", help="checkpoint path or card name (default: the embedded SmolLM2-135M)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    results = []
    ctx = mp.get_context("spawn")
    for fmt in args.formats:
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(
            target=_child, args=(queue, fmt, args.model, args.batches, args.prompt_len, args.steps)
        )
        proc.start()
        result = queue.get()
        proc.join()
        results.append(result)
        print(json.dumps(result), file=sys.stderr)

    header = ["format", "prefill tok/s"] + [f"decode b={b} (agg tok/s)" for b in args.batches]
    header += ["b=1 roofline tok/s", "peak RSS MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r["format"], f"{r['prefill_tps']:.0f}"]
        cells += [f"{r['decode'][b]['aggregate_tps']:.1f}" for b in args.batches]
        cells += [f"{r['roofline_batch1_tps']:.0f}", f"{r['peak_rss_mb']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
