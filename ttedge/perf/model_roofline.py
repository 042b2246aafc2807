"""The time of a whole forward pass, layer by layer: each layer's bytes (its weight shard, the KV cache it
reads, its activations) and FLOPs against one chip's roofline, a fixed overhead per op, and the
tensor-parallel collectives on the mesh (ttedge.ethernet_mesh).

A layer is the ops of LAYER_OPS; its time is ``max(bytes / bandwidth, FLOPs / peak) + ops x overhead``.
The overhead stands for everything the roofline leaves out (launch and dispatch, DRAM below its peak, ops
too small to reach either roof); it is calibrated per target (ttedge.perf.calibration).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.collectives import Collective, CollectivePlan, plan_on_mesh
from ttedge.ethernet_mesh.sharding import CollectiveCall, TensorParallelPlan
from ttedge.ethernet_mesh.topology import Mesh
from ttedge.perf.hardware import HardwareSpec
from ttedge.perf.memory import (
    ATTENTION_WEIGHTS,
    MLP_WEIGHTS,
    activation_bytes,
    kv_bytes_per_token,
    layer_weight_bytes,
    lm_head_bytes,
)
from ttedge.perf.precision import BYTES_PER_ELEMENT, Precision
from ttedge.perf.roofline import OpCost, roofline_seconds
from ttedge.runtime.tt_host import MAX_PREFILL_TOKENS

# The ops of one decoder layer in ttedge's ports (scripts/bench_kernels.py times the same list, less the
# cache update): what the per-op overhead is counted over.
LAYER_OPS = (
    "attn_norm",
    "qkv",
    "rope_qk",
    "kv_cache_update",
    "attention",
    "o",
    "attn_residual",
    "mlp_norm",
    "gate_up",
    "swiglu",
    "down",
    "mlp_residual",
)
# Outside the layers: the embedding lookup, the final norm and the LM head.
MODEL_OPS = ("embedding", "final_norm", "lm_head")


def pass_ops(config: ModelConfig) -> int:
    """The ops of one forward pass, each paying the per-op overhead once."""
    return config.num_layers * len(LAYER_OPS) + len(MODEL_OPS)


@dataclass(frozen=True)
class PassTime:
    """Seconds of one forward pass, by what they are spent on."""

    layers: float  # roofline time of every decoder layer
    lm_head: float  # roofline time of the LM head (and embedding lookup)
    overhead: float  # ops x the per-op overhead
    collectives: float
    # How many of the layers' roofline seconds were memory-bound rather than compute-bound.
    memory_bound_fraction: float

    @property
    def seconds(self) -> float:
        return self.layers + self.lm_head + self.overhead + self.collectives


@functools.cache
def _collective_seconds(collective: Collective, total_bytes: float, mesh: Mesh) -> float:
    # ethernet_mesh rebuilds the step plan on every call (45 ms on a Galaxy); a planner sweep repeats sizes.
    return _plan(collective, mesh).seconds(total_bytes, mesh)


@functools.cache
def _plan(collective: Collective, mesh: Mesh) -> CollectivePlan:
    return plan_on_mesh(collective, mesh)


def collectives_seconds(calls: tuple[CollectiveCall, ...], mesh: Mesh | None) -> float:
    if not calls:
        return 0.0
    if mesh is None:
        raise ValueError("a tensor-parallel pass needs a mesh for its collectives")
    return sum(call.count * _collective_seconds(call.collective, call.bytes, mesh) for call in calls)


def layer_cost(
    plan: TensorParallelPlan, precision: Precision, layer: int, rows: int, context_tokens: int, attended: int
) -> OpCost:
    """One layer on one chip for ``rows`` new token rows that attend to ``attended`` (query, key) pairs in
    all, reading ``context_tokens`` cached tokens' K and V."""
    config = plan.config
    weights = sum(_weight_elements(plan, name) for name in ATTENTION_WEIGHTS + MLP_WEIGHTS)
    heads = plan.query_heads_per_device
    return OpCost(
        bytes_moved=round(
            layer_weight_bytes(plan, precision, layer)
            + context_tokens * kv_bytes_per_token(plan, precision, layers=1)
            + 2 * activation_bytes(plan, precision, rows)  # written once, read once
        ),
        # 2 FLOPs per weight and row; Q.K and P.V: 2 x 2 x head_dim per head and attended pair.
        flops=2 * rows * weights + 4 * attended * heads * config.head_dim,
        data_format=precision.mlp_dtype(layer),
    )


def _weight_elements(plan: TensorParallelPlan, name: str) -> int:
    rows, cols = plan.weight(name).per_device_shape
    return rows * cols


def forward_time(
    plan: TensorParallelPlan,
    precision: Precision,
    chip: HardwareSpec,
    mesh: Mesh | None,
    op_overhead_s: float,
    rows: int,
    context_tokens: int,
    attended: int,
    logit_rows: int,
    collective_calls: tuple[CollectiveCall, ...],
) -> PassTime:
    config = plan.config
    layer_seconds = 0.0
    memory_seconds = 0.0
    for layer in range(config.num_layers):
        seconds, bound = roofline_seconds(
            layer_cost(plan, precision, layer, rows, context_tokens, attended), chip
        )
        layer_seconds += seconds
        memory_seconds += seconds if bound == "memory" else 0.0
    head = OpCost(
        # A chunk without logits (all but a long prompt's last) skips the head but still looks up embeddings.
        bytes_moved=round(
            (lm_head_bytes(plan, precision) if logit_rows else 0.0)
            + rows * config.hidden_size * BYTES_PER_ELEMENT[precision.embedding]
        ),
        flops=2 * logit_rows * _weight_elements(plan, "lm_head"),
        data_format=precision.lm_head,
    )
    return PassTime(
        layers=layer_seconds,
        lm_head=roofline_seconds(head, chip)[0],
        overhead=pass_ops(config) * op_overhead_s,
        collectives=collectives_seconds(collective_calls, mesh),
        memory_bound_fraction=memory_seconds / layer_seconds,
    )


def decode_step_time(
    plan: TensorParallelPlan,
    precision: Precision,
    chip: HardwareSpec,
    mesh: Mesh | None,
    op_overhead_s: float,
    batch: int,
    context: int,
    tokens_per_sequence: int = 1,
) -> PassTime:
    """One decode step: ``batch`` sequences, each ``context`` tokens long, each adding
    ``tokens_per_sequence`` rows (more than one when a speculative step verifies drafts)."""
    rows = batch * tokens_per_sequence
    return forward_time(
        plan,
        precision,
        chip,
        mesh,
        op_overhead_s,
        rows=rows,
        context_tokens=batch * context,
        attended=rows * context,
        logit_rows=rows,
        collective_calls=plan.decode_collectives(rows),
    )


def prefill_time(
    plan: TensorParallelPlan,
    precision: Precision,
    chip: HardwareSpec,
    mesh: Mesh | None,
    op_overhead_s: float,
    prompt_tokens: int,
) -> PassTime:
    """Prefill of one prompt, in chunks of at most MAX_PREFILL_TOKENS, each a forward pass that reads the
    weights again and attends to the chunks before it (causal: a prompt of T tokens has T(T+1)/2 pairs)."""
    total: PassTime | None = None
    done = 0
    while done < prompt_tokens:
        chunk = min(MAX_PREFILL_TOKENS, prompt_tokens - done)
        end = done + chunk
        attended = end * (end + 1) // 2 - done * (done + 1) // 2
        # Only the last chunk's last row needs logits.
        last = end == prompt_tokens
        part = forward_time(
            plan,
            precision,
            chip,
            mesh,
            op_overhead_s,
            rows=chunk,
            context_tokens=done,
            attended=attended,
            logit_rows=1 if last else 0,
            collective_calls=plan.collectives(chunk, 1 if last else 0),
        )
        total = part if total is None else _add(total, part)
        done = end
    if total is None:
        raise ValueError(f"a prompt has at least one token, got {prompt_tokens}")
    return total


def _add(a: PassTime, b: PassTime) -> PassTime:
    layers = a.layers + b.layers
    return PassTime(
        layers=layers,
        lm_head=a.lm_head + b.lm_head,
        overhead=a.overhead + b.overhead,
        collectives=a.collectives + b.collectives,
        memory_bound_fraction=(a.memory_bound_fraction * a.layers + b.memory_bound_fraction * b.layers)
        / layers,
    )
