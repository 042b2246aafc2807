"""The planner's predictions against this machine's CPU measurements, and the fit of its per-op overhead.

Measures the CPU's roofline now (ttedge.perf.hardware.host_cpu), predicts every configuration of
scripts/bench_decode.py's and scripts/bench_serving.py's JSON output for SmolLM2-135M, fits the per-op
overhead (ttedge.perf.calibration.fit_op_overhead) to the decode steps, and prints markdown tables of
predicted against measured with the error per configuration; also the Tenstorrent fit against the
model cards' published speeds. docs/planner.md has a run of it.

    python scripts/bench_decode.py --formats float32 bfloat16 int8 int4 auto --batches 1 8 32 \\
        --prompt-len 64 --steps 10 --json out/bench_decode.json
    python scripts/bench_serving.py --json out/bench_serving.json
    python scripts/validate_planner.py --decode-json out/bench_decode.json \\
        --serving-json out/bench_serving.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from ttedge import model_zoo
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.perf.calibration import (
    CPU_OP_OVERHEAD_S,
    PUBLISHED_PROMPT_TOKENS,
    Observation,
    fit_op_overhead,
    published_deployments,
    published_observations,
    published_ttft,
    tenstorrent_op_overhead,
    tenstorrent_prefill_efficiency,
)
from ttedge.perf.hardware import HardwareSpec, host_cpu
from ttedge.perf.memory import layer_weight_bytes, lm_head_bytes
from ttedge.perf.model_roofline import decode_step_time, pass_ops, prefill_time
from ttedge.perf.precision import cpu_precision
from ttedge.perf.speculative import speculative_estimate
from ttedge.perf.systems import FAMILIES

MODEL = "smollm2-135m-instruct"
# bench_serving's prompts: short user turns of about 30-40 tokens once in the chat template.
SERVING_PROMPT_TOKENS = 36


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted / measured - 1):+.0f}%"


def decode_observations(
    runs: list[dict], steps: int, cpu: HardwareSpec
) -> list[tuple[str, int, int, Observation]]:
    """(format, batch, context, observation) for each decode measurement; the median step of bench_decode's
    steps 2..steps-1 sits about steps/2 + 1 tokens after the prompt."""
    config = model_zoo.load_cards()[MODEL].config
    plan = plan_tensor_parallel(config, 1)
    rows = []
    for run in runs:
        context = run["prefill_tokens"] + steps // 2 + 1
        for batch_text, decode in run["decode"].items():
            batch = int(batch_text)
            precision = cpu_precision(run["format"], batch)
            step = decode_step_time(plan, precision, cpu, None, 0.0, batch, context)
            observation = Observation(
                f"{run['format']} b={batch}", decode["step_ms"] / 1e3, step.seconds, pass_ops(config)
            )
            rows.append((run["format"], batch, context, observation))
    return rows


def decode_table(rows: list[tuple[str, int, int, Observation]], overhead: float) -> str:
    lines = [
        "| format | batch | context | measured step ms | roofline ms | predicted ms | error | "
        "measured agg tok/s | predicted agg tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for fmt, batch, context, o in rows:
        predicted = o.predicted(overhead)
        lines.append(
            f"| {fmt} | {batch} | {context} | {o.measured_seconds * 1e3:.1f} | "
            f"{o.roofline_seconds * 1e3:.1f} | "
            f"{predicted * 1e3:.1f} | {_error(predicted, o.measured_seconds)} | "
            f"{batch / o.measured_seconds:.0f} | {batch / predicted:.0f} |"
        )
    errors = [abs(o.relative_error(overhead)) for *_, o in rows]
    lines.append(f"\nmedian |error| {100 * statistics.median(errors):.0f}%, max {100 * max(errors):.0f}%")
    return "\n".join(lines)


def prefill_table(runs: list[dict], overhead: float, cpu: HardwareSpec) -> str:
    config = model_zoo.load_cards()[MODEL].config
    plan = plan_tensor_parallel(config, 1)
    lines = ["| format | prompt | measured tok/s | predicted tok/s | error |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        tokens = run["prefill_tokens"]
        seconds = prefill_time(
            plan, cpu_precision(run["format"], tokens), cpu, None, overhead, tokens
        ).seconds
        lines.append(
            f"| {run['format']} | {tokens} | {run['prefill_tps']:.0f} | {tokens / seconds:.0f} | "
            f"{_error(tokens / seconds, run['prefill_tps'])} |"
        )
    return "\n".join(lines)


def weights_table(runs: list[dict]) -> str:
    """The planner's weight bytes against what bench_decode counted (its linears and LM head)."""
    config = model_zoo.load_cards()[MODEL].config
    plan = plan_tensor_parallel(config, 1)
    lines = ["| format | bench_decode bytes | planner bytes | error |", "|---|---:|---:|---:|"]
    for run in runs:
        if run["format"] == "auto":
            continue  # it holds two copies; the planner counts the one a step reads
        precision = cpu_precision(run["format"], 1)
        norms = 2 * config.hidden_size * 2  # planner counts norms in a layer; bench_decode does not
        planned = sum(
            layer_weight_bytes(plan, precision, i) - norms for i in range(config.num_layers)
        ) + lm_head_bytes(plan, precision)
        lines.append(
            f"| {run['format']} | {run['weight_bytes']:,} | {planned:,.0f} | "
            f"{_error(planned, run['weight_bytes'])} |"
        )
    return "\n".join(lines)


def serving_table(serving: dict, overhead: float, cpu: HardwareSpec) -> str:
    """A closed loop of N clients, each request prompt + ``max_tokens`` tokens: a round of N requests costs
    N prefills and max_tokens decode steps at batch N, whose context grows from the prompt to its end."""
    config = model_zoo.load_cards()[MODEL].config
    plan = plan_tensor_parallel(config, 1)
    weights = serving["settings"]["weights"]
    new_tokens = serving["settings"]["max_tokens"]
    mean_context = SERVING_PROMPT_TOKENS + new_tokens // 2
    lines = [
        "| streams | measured agg tok/s | predicted | error | measured tok/s/user | predicted | error | "
        "measured TTFT p50 ms | predicted | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in serving["levels"]:
        n = level["concurrency"]
        prompt = cpu_precision(weights, SERVING_PROMPT_TOKENS)
        prefill = prefill_time(plan, prompt, cpu, None, overhead, SERVING_PROMPT_TOKENS).seconds
        step = decode_step_time(plan, cpu_precision(weights, n), cpu, None, overhead, n, mean_context).seconds
        aggregate = n * new_tokens / (n * prefill + new_tokens * step)
        per_user = 1 / step
        # A new request waits, on average, for half the prefills of the others that arrive with it.
        ttft = prefill * (n + 1) / 2 + step
        lines.append(
            f"| {n} | {level['aggregate_tps']:.0f} | {aggregate:.0f} | "
            f"{_error(aggregate, level['aggregate_tps'])} "
            f"| {level['per_user_tps']:.1f} | {per_user:.1f} | {_error(per_user, level['per_user_tps'])} "
            f"| {level['ttft_p50_s'] * 1e3:.0f} | {ttft * 1e3:.0f} | {_error(ttft, level['ttft_p50_s'])} |"
        )
    return "\n".join(lines)


# docs/speculative.md, "Measured: prompt lookup", fixed k, copy prompts, batch 1 (13:49 UTC): k, the
# fraction of drafted tokens accepted, tokens per forward, speed-up over plain decoding.
PROMPT_LOOKUP_COPY_BATCH_1 = (
    (1, 0.63, 1.56, 1.35),
    (2, 0.53, 1.90, 1.65),
    (4, 0.41, 2.25, 1.40),
    (8, 0.26, 2.42, 1.28),
)


def speculative_table(overhead: float, cpu: HardwareSpec) -> str:
    """Leviathan's closed form with the measured acceptance as the per-token rate, a prompt-lookup draft
    that costs nothing, and the planner's plain and verify steps (k + 1 rows) at SmolLM2's `auto`."""
    config = model_zoo.load_cards()[MODEL].config
    plan = plan_tensor_parallel(config, 1)
    context = 200  # a chat prompt and half of a 128-token answer
    plain = decode_step_time(plan, cpu_precision("auto", 1), cpu, None, overhead, 1, context).seconds
    lines = [
        "| k | acceptance | measured tokens/forward | predicted | error | "
        "measured speed-up | predicted | error |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, acceptance, tokens, speedup in PROMPT_LOOKUP_COPY_BATCH_1:
        verify = decode_step_time(plan, cpu_precision("auto", k + 1), cpu, None, overhead, 1, context, k + 1)
        predicted = speculative_estimate(acceptance, k, 0.0, verify.seconds, plain)
        lines.append(
            f"| {k} | {acceptance} | {tokens} | {predicted.tokens_per_step:.2f} | "
            f"{_error(predicted.tokens_per_step, tokens)} | {speedup} | {predicted.speedup:.2f} | "
            f"{_error(predicted.speedup, speedup)} |"
        )
    return "\n".join(lines)


def tenstorrent_table() -> str:
    lines = [
        "| deployment (batch 1) | published ms/token | roofline ms | predicted ms | error | "
        f"published TTFT ms | predicted ({PUBLISHED_PROMPT_TOKENS} tokens) | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family in FAMILIES.values():
        overhead = tenstorrent_op_overhead(family)
        efficiency = tenstorrent_prefill_efficiency(family)
        lines.append(
            f"| **{family[0]} family: {overhead * 1e6:.1f} us per op, prefill at {efficiency:.0%} of peak** "
            "| | | | | | | |"
        )
        for o, d in zip(published_observations(family), published_deployments(family), strict=True):
            ttft = published_ttft(d, overhead, efficiency)
            published = "" if d.ttft_s is None else f"{d.ttft_s * 1e3:.0f}"
            ttft_error = "" if d.ttft_s is None else _error(ttft, d.ttft_s)
            lines.append(
                f"| {o.label} | {o.measured_seconds * 1e3:.1f} | {o.roofline_seconds * 1e3:.1f} | "
                f"{o.predicted(overhead) * 1e3:.1f} | {_error(o.predicted(overhead), o.measured_seconds)} | "
                f"{published} | {ttft * 1e3:.0f} | {ttft_error} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--decode-json", type=Path, required=True, help="scripts/bench_decode.py --json output"
    )
    parser.add_argument("--decode-steps", type=int, default=10, help="bench_decode's --steps (default: 10)")
    parser.add_argument("--serving-json", type=Path, help="scripts/bench_serving.py --json output")
    parser.add_argument(
        "--read-gb-s",
        type=float,
        help="use this read bandwidth instead of measuring it: the one of the machine the JSON was measured "
        "on, when this one is loaded now",
    )
    args = parser.parse_args()
    runs = json.loads(args.decode_json.read_text())
    cpu = host_cpu()
    if args.read_gb_s is not None:
        cpu = dataclasses.replace(
            cpu, dram_bytes_per_s=args.read_gb_s * 1e9, source=f"{cpu.source}; read bandwidth given"
        )
    print(
        f"{cpu.name}: {cpu.dram_bytes_per_s / 1e9:.1f} GB/s read, "
        + ", ".join(f"{dtype} {flops / 1e9:.0f} GFLOP/s" for dtype, flops in cpu.peak_flops.items())
        + f" ({cpu.source})\n"
    )
    rows = decode_observations(runs, args.decode_steps, cpu)
    fitted = fit_op_overhead([o for *_, o in rows])
    print(
        f"CPU per-op overhead fitted to these decode steps: {fitted * 1e6:.1f} us "
        f"(ttedge.perf.calibration.CPU_OP_OVERHEAD_S = {CPU_OP_OVERHEAD_S * 1e6:.1f} us)\n"
    )
    print("Decode, at the fitted overhead:\n")
    print(decode_table(rows, fitted))
    print("\nPrefill:\n")
    print(prefill_table(runs, fitted, cpu))
    print("\nWeight bytes:\n")
    print(weights_table(runs))
    if args.serving_json:
        print("\nServing:\n")
        print(serving_table(json.loads(args.serving_json.read_text()), fitted, cpu))
    print("\nSpeculative decoding, prompt lookup on copy prompts:\n")
    print(speculative_table(fitted, cpu))
    print("\nTenstorrent, against the model cards' published decode speeds:\n")
    print(tenstorrent_table())


if __name__ == "__main__":
    main()
