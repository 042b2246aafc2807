"""Decode tokens/s against tensor-parallel degree on CPU: one gloo process per rank on this machine, the
same greedy decode loop as ``bench_decode.py`` driven from rank 0 (runtime/tensor_parallel.py).

    python scripts/bench_tensor_parallel.py --json out/bench_tp.json --plot docs/img/bench_tensor_parallel.png

Two models: the embedded SmolLM2-135M (9 query / 3 KV heads: TP 1 and 3 only) and a synthetic
Llama-shaped model with random weights (16 query / 4 KV heads, hidden 1024, MLP 2816, 12 layers,
vocabulary 32000: TP 1, 2 and 4). Ranks share this machine's cores (threads per rank = cores / TP), so
what this measures is the cost of the plan's collectives and of the step broadcast, not a speed-up:
the cores a rank would add on another machine are not there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SYNTHETIC = {
    "name": "synthetic-llama-170m",
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_layers": 12,
    "num_heads": 16,
    "num_kv_heads": 4,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
DEGREES = {"smollm2": [1, 3], "synthetic": [1, 2, 4]}


def synthetic_checkpoint() -> Any:
    """A checkpoint of random weights (seeded per tensor) in the canonical layout, read lazily like a file."""
    import torch

    from ttedge.checkpoint.base import Checkpoint, TensorSource, canonical_shapes
    from ttedge.config import ModelConfig

    config = ModelConfig(**SYNTHETIC)  # type: ignore[arg-type]

    def source(index: int, name: str, shape: tuple[int, ...]) -> TensorSource:
        def load() -> torch.Tensor:
            generator = torch.Generator().manual_seed(index)
            noise = torch.randn(shape, generator=generator) * 0.02
            return noise + 1.0 if len(shape) == 1 else noise

        return TensorSource(name, shape, "F32", "synthetic", load)

    shapes = canonical_shapes(config)
    tensors = {name: source(i, name, shape) for i, (name, shape) in enumerate(shapes.items())}
    return Checkpoint(Path("synthetic"), "synthetic", config, tensors, Path("synthetic"))


def load(model: str) -> Any:
    from ttedge.checkpoint import load_checkpoint
    from ttedge.checkpoint.discovery import resolve_model

    return synthetic_checkpoint() if model == "synthetic" else load_checkpoint(resolve_model(None))


def decode_steps(runner: Any, vocab: int, batch: int, prompt_len: int, steps: int) -> list[float]:
    """Seconds of each greedy decode step of ``batch`` sequences after a ``prompt_len`` prefill each."""
    import torch

    from ttedge.runtime.base import StepInput

    generator = torch.Generator().manual_seed(batch)
    tables, last = [], []
    for _ in range(batch):
        table: list[int] = []
        runner.allocator.grow_table(table, prompt_len + steps + 1)
        prompt = torch.randint(100, vocab, (prompt_len,), generator=generator).tolist()
        (logits,) = runner.run([StepInput(prompt, 0, table)])
        tables.append(table)
        last.append(int(logits[-1].argmax()))
    times = []
    for step in range(steps):
        started = time.perf_counter()
        logits = runner.run(
            [StepInput([t], prompt_len + step, tab) for t, tab in zip(last, tables, strict=True)]
        )
        times.append(time.perf_counter() - started)
        last = [int(row[-1].argmax()) for row in logits]
    for table in tables:
        runner.allocator.free(table)
    return times


def rank_main(args: dict[str, Any]) -> list[dict[str, Any]] | None:
    import torch

    from ttedge.runtime.cpu import CpuModelRunner
    from ttedge.runtime.tensor_parallel import Rendezvous, TensorParallelRunner, load_shard, run_worker

    checkpoint = load(args["model"])
    kv_bytes = 256 << 20
    rendezvous = Rendezvous.from_environ()
    torch.set_num_threads(rendezvous.threads() if rendezvous else os.cpu_count() or 1)
    if rendezvous is None:
        from ttedge.models.llama.reference import LlamaModel

        runner: Any = CpuModelRunner(LlamaModel.from_checkpoint(checkpoint, args["weights"]), kv_bytes)
    else:
        shard = CpuModelRunner(load_shard(checkpoint, rendezvous, args["weights"]), kv_bytes)
        if not rendezvous.is_driver:
            run_worker(shard)
            return None
        runner = TensorParallelRunner(shard, checkpoint.config)
    rows = []
    for batch in args["batches"]:
        decode_steps(runner, checkpoint.config.vocab_size, batch, args["prompt_len"], 3)  # warm-up
        times = decode_steps(runner, checkpoint.config.vocab_size, batch, args["prompt_len"], args["steps"])
        step = statistics.median(times)
        rows.append({"batch": batch, "step_ms": step * 1e3, "tokens_per_s": batch / step})
    if rendezvous is not None:
        runner.close()
    return rows


def measure(model: str, tp: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """``rank_main`` on ``tp`` ranks of this machine; one process, without a group, at TP=1."""
    from ttedge.launcher import run_local_group

    settings = {**args, "model": model}
    rows = rank_main(settings) if tp == 1 else run_local_group(tp, rank_main, settings)
    return [{"model": model, "tp": tp, **row} for row in rows or []]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, model in zip(axes, DEGREES, strict=True):
        for batch in sorted({r["batch"] for r in rows}):
            points = [
                (r["tp"], r["tokens_per_s"]) for r in rows if r["model"] == model and r["batch"] == batch
            ]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=f"batch {batch}")
        axis.set(title=model, xlabel="TP degree (ranks on this 2-core machine)", ylabel="decode tokens/s")
        axis.set_xticks(DEGREES[model])
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(DEGREES), default=list(DEGREES))
    parser.add_argument("--weights", default="auto", help="CPU weight format (default: %(default)s)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--plot", type=Path, help="write a PNG here")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("weights", "batches", "prompt_len", "steps")}
    rows = [row for model in args.models for tp in DEGREES[model] for row in measure(model, tp, settings)]
    print("| model | TP | batch | ms/step | tokens/s | vs TP=1 |\n|---|---|---|---|---|---|")
    for row in rows:
        base = next(
            r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"] and r["tp"] == 1
        )
        ratio = row["tokens_per_s"] / base["tokens_per_s"]
        cells = [row["model"], row["tp"], row["batch"], f"{row['step_ms']:.1f}", f"{row['tokens_per_s']:.1f}"]
        print("| " + " | ".join(map(str, cells)) + f" | {ratio:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"settings": settings, "cores": os.cpu_count(), "rows": rows}, indent=1)
        )
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
