"""Per-op microbenchmarks of one decode layer, placed against the hardware roofline, and the data movement of
the TT-Lang kernels in the simulator.

- CPU (always): every op of one decode layer of a model card's architecture (default SmolLM2-135M) as the
  reference model runs it -- RMSNorm, the fused QKV projection, rope on Q and K, decode attention over
  ``--context`` cached tokens, the O projection, the residual add, RMSNorm, the fused gate/up projection,
  SiLU-and-multiply, the down projection, the residual add -- at each CPU weight format (projections differ
  per format; the other ops per activation dtype) and each ``--rows`` (tokens in the step). Each op is timed
  ``--iterations`` times, the layer's ops in turn, cycling through as many distinct layers as the model has
  (so weights and KV cache come from DRAM, as in a real step); the fastest is reported (the least disturbed
  on a shared machine), the median is in the JSON. Time, achieved GB/s and GFLOP/s, and % of the roofline
  of this CPU, measured at start (``ttedge.perf.hardware.host_cpu``): bytes are each input read and each
  output written once.
- TT-Lang kernels (unless ``--no-simulator``): each kernel at the layer's decode shapes (32 rows) in
  tt-lang-sim, with what its trace says: tiles read and written per tensor, DRAM bytes, dataflow-buffer
  tiles and L1 bytes per node, and the least time those DRAM bytes take on each card's bandwidth. The
  simulator's wall time is not a speed: it is Python executing every tile.
- TT (a card and ttnn present; ``bash scripts/setup_tt.sh --with-torch``, then ``.venv-tt/bin/python``): the
  port's decode layer for 32 users, op by op (norm, attention, residual+norm, w1, w3, SiLU-multiply, w2,
  residual add) in the card preset ``--tt-preset``, each timed to the end of ``ttnn.synchronize_device``
  (device time plus dispatch), against the card's roofline; otherwise it says why it skipped.

    python scripts/bench_kernels.py [--model smollm2-135m-instruct] [--rows 1 32] [--formats float32 int4]
        [--context 256] [--iterations 50] [--layer-copies N] [--json out.json]

Run as pytest-benchmark tests too: ``python -m pytest scripts/bench_kernels.py --benchmark-enable``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ttedge.config import ModelConfig
from ttedge.kernels.simulation import KernelCase, Simulator, SimulatorRun
from ttedge.model_zoo import ModelCard, find_card
from ttedge.models.llama.linear import AutoLinear, Linear, WeightFormat, build_linear
from ttedge.models.llama.reference import RotaryEmbedding, rms_norm, rope_inverse_frequencies
from ttedge.perf.hardware import CARDS, HardwareSpec, host_cpu
from ttedge.perf.roofline import CostedOp, OpCost, place, time_round_robin
from ttedge.runtime.base import DeviceUnavailable
from ttedge.runtime.tt_host import MOCK_CLUSTER_VARIABLE, check_tt_device

DEFAULT_MODEL = "smollm2-135m-instruct"
SIMULATOR_ROWS = 32  # one decode step of 32 users: one tile row
BATCH = 32  # the TT port's decode users per step


@dataclass(frozen=True)
class OpTiming:
    op: str
    weight_format: str
    rows: int
    seconds: float
    median_seconds: float
    bytes_moved: int
    flops: int
    achieved_gb_per_s: float
    achieved_gflop_per_s: float
    roofline_seconds: float
    bound: str
    percent_of_roofline: float


def bytes_read_per_call(linear: Linear, rows: int) -> int:
    """Weight bytes one call reads: ``auto`` keeps two copies and reads the one its row count picks."""
    if isinstance(linear, AutoLinear):
        return linear.part_for(rows * linear.in_features).nbytes
    return linear.nbytes


def cycling(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """A call that runs the next of ``calls`` each time."""
    turn = itertools.cycle(calls)
    return lambda: next(turn)()


def decode_layer_ops(
    config: ModelConfig,
    fmt: WeightFormat,
    rows: int,
    context: int,
    generator: torch.Generator,
    copies: int = 1,
) -> list[CostedOp]:
    """One decode layer's ops as ``reference.LlamaModel`` runs them, on random weights and activations.

    ``copies`` distinct layers (weights, activations, KV cache), each op taking the next one per call: with
    as many as the model has layers, data streams from DRAM as in a real step, not from caches the previous
    call warmed (one SmolLM2 layer's weights fit this machine's last-level cache)."""
    dtype = fmt.activation_dtype
    size = torch.tensor([], dtype=dtype).element_size()
    compute = str(dtype).removeprefix("torch.")
    hidden, mlp, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_heads, config.num_kv_heads
    rope = RotaryEmbedding(rope_inverse_frequencies(config), context + 1, dtype)
    positions = torch.full((rows,), context)
    rope_elements = rows * (heads + kv_heads) * head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    def linear(name: str, outs: Sequence[int], inputs: int) -> tuple[str, Callable[[], object], OpCost]:
        weights = [torch.randn(out, inputs, generator=generator) * 0.02 for out in outs]
        layer, x = build_linear(weights, fmt), randn(rows, inputs)
        moved = bytes_read_per_call(layer, rows) + rows * (inputs + sum(outs)) * size
        return name, lambda: layer(x), OpCost(moved, 2 * rows * inputs * sum(outs), compute)

    def norm(name: str) -> tuple[str, Callable[[], object], OpCost]:
        x, weight = randn(rows, hidden), randn(hidden)
        cost = OpCost((2 * rows * hidden + hidden) * size, 4 * rows * hidden, compute)
        return name, lambda: rms_norm(x, weight, config.rms_norm_eps), cost

    def residual_add(name: str) -> tuple[str, Callable[[], object], OpCost]:
        x, update = randn(rows, hidden), randn(rows, hidden)
        return name, lambda: x.add_(update), OpCost(3 * rows * hidden * size, rows * hidden, compute)

    def rope_qk() -> tuple[str, Callable[[], object], OpCost]:
        qk = randn(rows, heads + kv_heads, head_dim)
        cost = OpCost((2 * rope_elements + 2 * rows * head_dim) * size, 3 * rope_elements, compute)
        cos, signed_sin = rope.cos[positions].unsqueeze(1), rope.signed_sin[positions].unsqueeze(1)
        return "rope_qk", lambda: rope(qk, cos, signed_sin), cost

    def attention() -> tuple[str, Callable[[], object], OpCost]:
        # Decode attention with the query heads of one KV head folded together, as the reference does.
        queries = randn(rows, kv_heads, heads // kv_heads, head_dim)
        keys, values = randn(rows, kv_heads, context, head_dim), randn(rows, kv_heads, context, head_dim)
        cost = OpCost(
            (2 * rows * heads * head_dim + 2 * rows * kv_heads * context * head_dim) * size,
            4 * rows * heads * context * head_dim,
            compute,
        )
        return "attention", lambda: F.scaled_dot_product_attention(queries, keys, values), cost

    def swiglu() -> tuple[str, Callable[[], object], OpCost]:
        gate, up = randn(rows, mlp), randn(rows, mlp)
        return "swiglu", lambda: F.silu(gate).mul_(up), OpCost(3 * rows * mlp * size, 5 * rows * mlp, compute)

    def one_layer() -> list[tuple[str, Callable[[], object], OpCost]]:
        return [
            norm("attn_norm"),
            linear("qkv", (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), hidden),
            rope_qk(),
            attention(),
            linear("o", (hidden,), heads * head_dim),
            residual_add("attn_residual"),
            norm("mlp_norm"),
            linear("gate_up", (mlp, mlp), hidden),
            swiglu(),
            linear("down", (hidden,), mlp),
            residual_add("mlp_residual"),
        ]

    layers = [one_layer() for _ in range(copies)]
    return [
        CostedOp(name, cycling([layer[index][1] for layer in layers]), cost)
        for index, (name, _, cost) in enumerate(layers[0])
    ]


def measure_cpu(
    config: ModelConfig,
    formats: Sequence[WeightFormat],
    rows_list: Sequence[int],
    context: int,
    iterations: int,
    copies: int,
    cpu: HardwareSpec,
) -> list[OpTiming]:
    timings: list[OpTiming] = []
    for fmt in formats:
        for rows in rows_list:
            ops = decode_layer_ops(config, fmt, rows, context, torch.Generator().manual_seed(0), copies)
            with torch.inference_mode():
                times = time_round_robin(ops, iterations)
            timings.extend(timing_row(op.name, fmt.value, rows, *times[op.name], op.cost, cpu) for op in ops)
    return timings


def timing_row(
    op: str, weight_format: str, rows: int, fastest: float, median: float, cost: OpCost, spec: HardwareSpec
) -> OpTiming:
    point = place(cost, fastest, spec)
    return OpTiming(
        op=op,
        weight_format=weight_format,
        rows=rows,
        seconds=fastest,
        median_seconds=median,
        bytes_moved=cost.bytes_moved,
        flops=cost.flops,
        achieved_gb_per_s=point.achieved_bytes_per_s / 1e9,
        achieved_gflop_per_s=point.achieved_flops / 1e9,
        roofline_seconds=point.roofline_seconds,
        bound=point.bound,
        percent_of_roofline=point.percent_of_roofline,
    )


def kernel_cases(config: ModelConfig, grid: tuple[int, int]) -> list[KernelCase]:
    """Each TT-Lang kernel at the layer's decode shapes, 32 rows (users)."""
    generator = torch.Generator().manual_seed(0)
    rows, hidden, mlp = SIMULATOR_ROWS, config.hidden_size, config.intermediate_size
    angles = torch.rand(rows, config.head_dim, generator=generator) * 2 * math.pi
    target = torch.randint(0, config.vocab_size, (rows, 5), generator=generator)
    return [
        KernelCase(
            "residual_rmsnorm",
            grid,
            {
                "x": torch.randn(rows, hidden),
                "residual": torch.randn(rows, hidden),
                "weight": torch.ones(hidden),
            },
            {"eps": config.rms_norm_eps},
        ),
        KernelCase("swiglu", grid, {"gate": torch.randn(rows, mlp), "up": torch.randn(rows, mlp)}),
        KernelCase(
            "rotary",
            grid,
            {"x": torch.randn(rows, config.q_size), "cos": angles.cos(), "sin": angles.sin()},
            {"head_dim": config.head_dim},
        ),
        KernelCase("speculative_acceptance", grid, {"draft": target[:, :4], "target_argmax": target}),
    ]


def simulator_report(run: SimulatorRun, kernel: str) -> dict[str, Any]:
    return {
        "kernel": kernel,
        "grid": run.nodes,
        "tensors": [asdict(t) for t in run.traffic],
        "dram_tiles": run.dram_tiles,
        "dram_bytes": run.dram_bytes,
        "dfb_blocks": run.dfb_blocks,
        "dfb_tiles": run.dfb_tiles,
        "l1_bytes_per_node": run.l1_bytes_per_node,
        "dram_roofline_us": {
            name: 1e6 * run.dram_bytes / card.dram_bytes_per_s for name, card in CARDS.items()
        },
        "simulator_seconds": run.seconds,
    }


def measure_tt(
    card: ModelCard, preset: str, context: int, iterations: int, ttlang_kernels: bool
) -> tuple[str, list[OpTiming]]:
    """The port's decode layer on the card, op by op (``ttedge.models.llama.tt.op_timing``), or why not."""
    try:
        check_tt_device()
    except DeviceUnavailable as missing:
        return f"skipped: {missing}", []
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        return f"skipped: {MOCK_CLUSTER_VARIABLE} points ttnn at a mock cluster, which computes nothing", []
    import ttnn

    from ttedge.models.llama.tt.op_timing import card_of, decode_layer_ops, time_ops
    from ttedge.runtime.tt import open_tt_device

    mesh = open_tt_device()
    try:
        spec = card_of(mesh)
        ops = decode_layer_ops(mesh, card.config, card.tt.preset(preset), context, ttlang_kernels)
        timed = time_ops(mesh, ops, iterations)
    finally:
        ttnn.close_device(mesh)
    status = f"measured on {spec.name}: each op from its call to the end of ttnn.synchronize_device"
    return status, [timing_row(t.op, preset, BATCH, t.seconds, t.median_seconds, t.cost, spec) for t in timed]


def format_table(timings: Sequence[OpTiming]) -> str:
    lines = [
        f"{'format':<9} {'rows':>4} {'op':<14} {'time us':>9} {'GB/s':>8} {'GFLOP/s':>9} "
        f"{'roofline':>9} bound",
        "-" * 72,
    ]
    for t in timings:
        lines.append(
            f"{t.weight_format:<9} {t.rows:>4} {t.op:<14} {t.seconds * 1e6:>9.1f} "
            f"{t.achieved_gb_per_s:>8.2f} {t.achieved_gflop_per_s:>9.2f} "
            f"{t.percent_of_roofline:>8.1f}% {t.bound}"
        )
    return "\n".join(lines)


def format_simulator_table(reports: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'kernel':<24} {'DRAM tiles':>10} {'DRAM KiB':>9} {'DFB tiles':>9} {'L1 KiB/node':>11} "
        f"{'n150 us':>8} {'p150 us':>8}",
        "-" * 86,
    ]
    for r in reports:
        lines.append(
            f"{r['kernel']:<24} {r['dram_tiles']:>10} {r['dram_bytes'] / 1024:>9.0f} {r['dfb_tiles']:>9} "
            f"{r['l1_bytes_per_node'] / 1024:>11.1f} {r['dram_roofline_us']['n150']:>8.2f} "
            f"{r['dram_roofline_us']['p150']:>8.2f}"
        )
        lines.extend(
            f"    {t['tensor']:<20} read {t['tiles_read']:>5} written {t['tiles_written']:>5} tiles"
            for t in r["tensors"]
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model card name (its architecture is used)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="tokens per decode step")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=[f.value for f in WeightFormat],
        choices=[f.value for f in WeightFormat],
    )
    parser.add_argument("--context", type=int, default=256, help="cached tokens each row attends to")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument(
        "--layer-copies", type=int, help="distinct layers cycled through (default: the model's layer count)"
    )
    parser.add_argument("--sim-grid", type=int, nargs=2, default=[2, 4], metavar=("ROWS", "COLS"))
    parser.add_argument("--no-simulator", action="store_true", help="skip the TT-Lang simulator report")
    parser.add_argument("--tt-preset", default="performance", help="the card's precision preset on TT")
    parser.add_argument(
        "--ttlang-kernels",
        action="store_true",
        help="on TT, the port's TT-Lang kernels where tt-lang is installed",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    card = find_card(args.model)
    if card is None:
        parser.error(f"no model card named {args.model!r}")
    cpu = host_cpu()
    copies = args.layer_copies or card.config.num_layers
    formats = [WeightFormat(f) for f in args.formats]
    timings = measure_cpu(card.config, formats, args.rows, args.context, args.iterations, copies, cpu)
    print(f"{card.name}, one decode layer ({copies} copies cycled), context {args.context}, on {cpu.name}: "
          f"{cpu.dram_bytes_per_s / 1e9:.1f} GB/s, "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in cpu.peak_flops.items()))  # fmt: skip
    print(format_table(timings))

    simulated: list[dict[str, Any]] = []
    if not args.no_simulator:
        with Simulator() as simulator:
            for case in kernel_cases(card.config, tuple(args.sim_grid)):
                simulated.append(simulator_report(simulator.run(case), case.kernel))
        print(
            f"\nTT-Lang kernels in tt-lang-sim, {SIMULATOR_ROWS} rows, {simulated[0]['grid']} nodes "
            "(card columns: the least time the kernel's DRAM traffic takes at that card's bandwidth)"
        )
        print(format_simulator_table(simulated))
    tt, tt_timings = measure_tt(card, args.tt_preset, args.context, args.iterations, args.ttlang_kernels)
    print(f"\nTT (ttnn on a card), one decode layer of {BATCH} users, preset {args.tt_preset}: {tt}")
    if tt_timings:
        print(format_table(tt_timings))

    results = {
        "model": card.id,
        "context": args.context,
        "iterations": args.iterations,
        "layer_copies": copies,
        "host_cpu": asdict(cpu),
        "cpu": [asdict(t) for t in timings],
        "simulator": simulated,
        "tt": tt,
        "tt_ops": [asdict(t) for t in tt_timings],
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


@pytest.mark.parametrize("fmt", list(WeightFormat), ids=lambda fmt: fmt.value)
def test_decode_layer_ops(benchmark: Any, fmt: WeightFormat) -> None:
    """pytest-benchmark entry point: one SmolLM2 decode layer, one row, every op back to back."""
    card = find_card(DEFAULT_MODEL)
    assert card is not None
    ops = decode_layer_ops(card.config, fmt, 1, 256, torch.Generator().manual_seed(0))

    def layer() -> None:
        with torch.inference_mode():
            for op in ops:
                op.run()

    benchmark(layer)


if __name__ == "__main__":
    main(sys.argv[1:])
