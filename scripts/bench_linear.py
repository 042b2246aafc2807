"""Time the CPU weight formats on the projections of one SmolLM2-135M decode step.

One step is 30 layers of QKV (fused), O, gate+up (fused) and down projections plus the LM head,
run through ``build_linear`` exactly as the model calls it, with random weights (30 distinct layers,
as many bytes as the model's). Attention, norms and the rest of the step are not included: this is
the matmul floor a format puts under the end-to-end speed.

Formats are timed round-robin in one process so that load from other processes on the machine hits
them alike, a few steps back to back per turn as a decode loop runs them; the reported time is the
fastest step (the least disturbed one), the median is in the JSON. Also timed: each format's LM head
alone (what ``auto``'s head threshold is chosen on), and converting a float32
stream to bfloat16 and back around every projection, which is what a model pays per step if it
keeps float32 activations with a bfloat16-activation format.

    python scripts/bench_linear.py [--rows 1 8 32] [--formats float32 int4 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ttedge.models.llama.linear import Linear, WeightFormat, build_linear

HIDDEN, INTERMEDIATE, HEAD_DIM, HEADS, KV_HEADS, VOCAB, LAYERS = 576, 1536, 64, 9, 3, 49152, 30
# (name, [out_features of each fused part], in_features)
PROJECTIONS = (
    ("qkv", (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), HIDDEN),
    ("o", (HIDDEN,), HEADS * HEAD_DIM),
    ("gate_up", (INTERMEDIATE, INTERMEDIATE), HIDDEN),
    ("down", (HIDDEN,), INTERMEDIATE),
)


def build_step(fmt: WeightFormat, generator: torch.Generator) -> list[Linear]:
    def linear(outs: Sequence[int], inp: int) -> Linear:
        return build_linear([torch.randn(out, inp, generator=generator) * 0.02 for out in outs], fmt)

    layers = [linear(outs, inp) for _ in range(LAYERS) for _, outs, inp in PROJECTIONS]
    return [*layers, linear((VOCAB,), HIDDEN)]


def inputs_for(step: list[Linear], rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
    by_width = {width: torch.randn(rows, width).to(dtype) for width in {lin.in_features for lin in step}}
    return [by_width[lin.in_features] for lin in step]


def run(step: list[Linear], inputs: list[torch.Tensor]) -> None:
    for linear, x in zip(step, inputs, strict=True):
        linear(x)


def conversions(step: list[Linear], rows: int) -> Callable[[], None]:
    """float32 -> bfloat16 of every projection's input and bfloat16 -> float32 of every output."""
    ins = [torch.randn(rows, lin.in_features) for lin in step]
    outs = [torch.randn(rows, lin.out_features).bfloat16() for lin in step]

    def convert() -> None:
        for x in ins:
            x.to(torch.bfloat16)
        for y in outs:
            y.float()

    return convert


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="tokens per step")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=[f.value for f in WeightFormat],
        choices=[f.value for f in WeightFormat],
    )
    parser.add_argument("--repeats", type=int, default=15, help="turns of every job, round-robin")
    parser.add_argument("--burst", type=int, default=3, help="back-to-back runs of a job per turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    formats = [WeightFormat(f) for f in args.formats]

    generator = torch.Generator().manual_seed(0)
    steps = {fmt: build_step(fmt, generator) for fmt in formats}
    # Conversion costs do not depend on the format's weights; any step has the right shapes.
    jobs: dict[tuple[str, int], Callable[[], None]] = {}
    for rows in args.rows:
        for fmt, step in steps.items():
            inputs = inputs_for(step, rows, fmt.activation_dtype)
            jobs[fmt.value, rows] = lambda step=step, inputs=inputs: run(step, inputs)
            # The LM head alone: the choice of its format (``build_lm_head``) is made on this row.
            jobs[f"{fmt.value} LM head", rows] = lambda step=step, inputs=inputs: run(step[-1:], inputs[-1:])
        jobs["convert f32<->bf16", rows] = conversions(steps[formats[0]], rows)

    with torch.inference_mode():
        for job in jobs.values():
            job()
            job()
        times: dict[tuple[str, int], list[float]] = {key: [] for key in jobs}
        for _ in range(args.repeats):
            for key, job in jobs.items():
                # Back to back, as a decode loop runs a model: its weights may stay in the last-level cache.
                for _ in range(args.burst):
                    start = time.perf_counter()
                    job()
                    times[key].append(time.perf_counter() - start)

    names = [*(f.value for f in formats), *(f"{f.value} LM head" for f in formats), "convert f32<->bf16"]
    nbytes = {fmt.value: sum(lin.nbytes for lin in step) for fmt, step in steps.items()}
    header = f"{'format':20s} {'MB':>6s}" + "".join(
        f" | rows={r:<3d} {'ms':>6s} {'tok/s':>7s}" for r in args.rows
    )
    samples = args.repeats * args.burst
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastest of {samples} steps")
    print(header)
    print("-" * len(header))
    for name in names:
        size = f"{nbytes[name] / 1e6:6.0f}" if name in nbytes else " " * 6
        cells = []
        for rows in args.rows:
            best = min(times[name, rows])
            rate = f"{rows / best:7.0f}" if name in nbytes else " " * 7
            cells.append(f" | {'':8s} {best * 1e3:6.2f} {rate}")
        print(f"{name:20s} {size}" + "".join(cells))

    if args.json:
        result = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "steps_timed": samples,
            "nbytes": nbytes,
            "ms": {
                name: {
                    str(rows): {
                        "min": min(times[name, rows]) * 1e3,
                        "median": statistics.median(times[name, rows]) * 1e3,
                    }
                    for rows in args.rows
                }
                for name in names
            },
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
