"""Does a model fit: the DRAM one chip needs for its shard of the weights, its users' KV cache, the
activations of the largest step and the decode trace, against what the chip has."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttedge.ethernet_mesh.sharding import TensorParallelPlan
from ttedge.perf.precision import BYTES_PER_ELEMENT, Precision
from ttedge.runtime.tt_host import BLOCK_TOKENS, MAX_PREFILL_TOKENS

ATTENTION_WEIGHTS = ("q", "k", "v", "o")
MLP_WEIGHTS = ("gate", "up", "down")
NORM_WEIGHTS = ("input_norm", "post_attention_norm")
# tt_transformers opens its devices with trace_region_size=30000000 (models/tt_transformers/demo and tests):
# DRAM kept for the captured decode trace.
TRACE_REGION_BYTES = 30_000_000
# ASSUMPTION: DRAM a Tenstorrent chip keeps for firmware, dispatch queues and allocator alignment, which
# ttnn does not hand to tensors. Tenstorrent publishes no figure; 5% of the chip.
RESERVED_FRACTION = 0.05


def _elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def layer_weight_bytes(plan: TensorParallelPlan, precision: Precision, layer: int) -> float:
    """One decoder layer's weights on one chip."""
    attention = sum(_elements(plan.weight(n).per_device_shape) for n in ATTENTION_WEIGHTS)
    mlp = sum(_elements(plan.weight(n).per_device_shape) for n in MLP_WEIGHTS)
    norms = sum(_elements(plan.weight(n).per_device_shape) for n in NORM_WEIGHTS)
    return (
        attention * BYTES_PER_ELEMENT[precision.attention]
        + mlp * BYTES_PER_ELEMENT[precision.mlp_dtype(layer)]
        + norms * BYTES_PER_ELEMENT[precision.activations]
    )


def lm_head_bytes(plan: TensorParallelPlan, precision: Precision) -> float:
    """The LM head's shard on one chip (a separate copy even with tied embeddings: it is tiled in another
    format than the row-major embedding table)."""
    return _elements(plan.weight("lm_head").per_device_shape) * BYTES_PER_ELEMENT[precision.lm_head]


def weight_bytes(plan: TensorParallelPlan, precision: Precision) -> float:
    """Every weight one chip holds: its layer shards, the LM head's, the replicated embedding and norms."""
    layers = sum(layer_weight_bytes(plan, precision, i) for i in range(plan.config.num_layers))
    embedding = _elements(plan.weight("embedding").per_device_shape) * BYTES_PER_ELEMENT[precision.embedding]
    final_norm = (
        _elements(plan.weight("final_norm").per_device_shape) * BYTES_PER_ELEMENT[precision.activations]
    )
    return layers + lm_head_bytes(plan, precision) + embedding + final_norm


def kv_bytes_per_token(plan: TensorParallelPlan, precision: Precision, layers: int | None = None) -> float:
    """K and V of one token on one chip, over ``layers`` layers (default: all)."""
    config = plan.config
    count = config.num_layers if layers is None else layers
    return 2 * count * plan.kv_heads_per_device * config.head_dim * BYTES_PER_ELEMENT[precision.kv_cache]


def kv_cache_bytes(plan: TensorParallelPlan, precision: Precision, users: int, context: int) -> float:
    """The paged KV cache for ``users`` sequences of ``context`` tokens each, whole 32-token blocks."""
    blocks = -(-context // BLOCK_TOKENS)
    return users * blocks * BLOCK_TOKENS * kv_bytes_per_token(plan, precision)


def activation_bytes(plan: TensorParallelPlan, precision: Precision, rows: int) -> float:
    """The live activations of one step over ``rows`` token rows on one chip: the residual stream and its
    normalised copy, Q/K/V and attention output, gate, up and their product (flash attention keeps no
    score matrix). Prefill runs at most MAX_PREFILL_TOKENS rows at a time."""
    config = plan.config
    per_row = (
        2 * config.hidden_size
        + 2 * config.q_size // plan.devices
        + 2 * plan.kv_heads_per_device * config.head_dim
        + 3 * config.intermediate_size // plan.devices
    )
    return min(rows, MAX_PREFILL_TOKENS) * per_row * BYTES_PER_ELEMENT[precision.activations]


@dataclass(frozen=True)
class MemoryFit:
    """One chip's DRAM budget, in bytes."""

    weights: float
    kv_cache: float
    activations: float
    trace: float
    reserved: float
    capacity: float

    @property
    def needed(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.trace + self.reserved

    @property
    def fits(self) -> bool:
        return self.needed <= self.capacity

    @property
    def free_for_kv(self) -> float:
        """What the KV cache may take at most: the capacity less everything else."""
        return self.capacity - (self.needed - self.kv_cache)


def memory_fit(
    plan: TensorParallelPlan,
    precision: Precision,
    capacity: float,
    users: int,
    context: int,
    prompt_tokens: int,
    on_tenstorrent: bool = True,
) -> MemoryFit:
    """What one chip of ``capacity`` bytes needs to serve ``users`` sequences of ``context`` tokens after
    prefilling prompts of ``prompt_tokens``. The trace region and the firmware's reserve are a Tenstorrent
    chip's; the CPU has neither."""
    if users < 1 or context < 1 or prompt_tokens < 1:
        raise ValueError(
            f"users, context and prompt must be positive (got {users}, {context}, {prompt_tokens})"
        )
    return MemoryFit(
        weights=weight_bytes(plan, precision),
        kv_cache=kv_cache_bytes(plan, precision, users, context),
        activations=activation_bytes(plan, precision, max(users, prompt_tokens)),
        trace=TRACE_REGION_BYTES if on_tenstorrent else 0.0,
        reserved=RESERVED_FRACTION * capacity if on_tenstorrent else 0.0,
        capacity=capacity,
    )
