"""Shapes and tensor helpers shared by the TT validation tests (mock validation: no numerics).

Device tensors are made from numpy rather than torch: `.venv-tt` carries no torch (see
docs/tt-validation.md), and on a mock cluster their contents never matter, only shapes, layouts, dtypes
and memory placement do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset, find_card

TILE = 32
# Decode runs one token for each of up to 32 users: the batch fills one tile row.
BATCH = 32
# ttedge's paged KV cache holds 32 tokens per block (one tile row).
BLOCK_TOKENS = 32
BLOCKS_PER_USER = 4

_SMOLLM2 = find_card("smollm2-135m-instruct")
assert _SMOLLM2 is not None, "the model zoo lost the SmolLM2-135M card"
SMOLLM2: ModelConfig = _SMOLLM2.config
SMOLLM2_PRESET: PrecisionPreset = _SMOLLM2.tt.preset("performance")


def dtype(name: str) -> ttnn.DataType:
    """A ttnn data type from the name a model card uses (`bfloat8_b`, ...)."""
    return getattr(ttnn, name)


def zeros(
    mesh: ttnn.MeshDevice,
    shape: tuple[int, ...],
    data_type: ttnn.DataType = ttnn.bfloat16,
    *,
    layout: ttnn.Layout = ttnn.TILE_LAYOUT,
    memory_config: ttnn.MemoryConfig = ttnn.DRAM_MEMORY_CONFIG,
    shard_dim: int | None = None,
) -> ttnn.Tensor:
    """A device tensor of zeros, replicated over the mesh or split along `shard_dim`.

    Built on the host first and then moved: in ttnn 0.81.1 the numpy constructor given a *sharded*
    memory config fails with an unhelpful "ndarray_import failed", while host-then-`to` works.
    """
    host_dtype = np.int32 if data_type == ttnn.int32 else np.float32
    mapper = (
        ttnn.replicate_tensor_to_mesh_mapper(mesh)
        if shard_dim is None
        else ttnn.shard_tensor_to_mesh_mapper(mesh, shard_dim)
    )
    host = ttnn.Tensor(
        tensor=np.zeros(shape, host_dtype), data_type=data_type, layout=layout, mesh_mapper=mapper
    )
    return host.to(mesh, memory_config)


# One core per decode user, as a rectangle that fits every worker grid here (Wormhole 8 x 8, Blackhole
# 13 x 10): concat-heads refuses a batch spread over a ragged set of cores (see test_misconfigurations).
BATCH_GRID = ttnn.CoreGrid(y=4, x=8)


def height_sharded(
    shard: tuple[int, int], grid: ttnn.CoreGrid | ttnn.CoreRangeSet = BATCH_GRID
) -> ttnn.MemoryConfig:
    """L1 height-sharded placement with one `shard` per core of `grid`, in row-major core order."""
    return ttnn.create_sharded_memory_config(
        shard,
        grid,
        ttnn.ShardStrategy.HEIGHT,
        ttnn.ShardOrientation.ROW_MAJOR,
        use_height_and_width_as_shard_shape=True,
    )


@dataclass(frozen=True)
class DecodeLayerRun:
    output: ttnn.Tensor
    attention: ttnn.Tensor  # after concat heads, before the output projection
    mlp: ttnn.Tensor  # after the down projection (and its collectives when the MLP is split)


def decode_layer(mesh: ttnn.MeshDevice, config: ModelConfig, preset: PrecisionPreset) -> DecodeLayerRun:
    """One Llama decode layer as plain ttnn ops, in the order the reference TT port runs them.

    Attention is replicated on every chip (SmolLM2's 9/3 heads do not split over two); on a multi-chip
    mesh the MLP is split: gate/up column-parallel, down row-parallel, joined by a reduce-scatter and
    an all-gather (an all-reduce). Weights, caches and activations are zeros: only the op checks,
    allocations and program creation are under test.
    """
    split = mesh.get_num_devices() > 1
    hidden, ffn, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv_heads = config.num_heads, config.num_kv_heads
    attention_dtype, mlp_dtype = dtype(preset.attention_weights), dtype(preset.mlp_weights)
    kv_dtype = dtype(preset.kv_cache)

    # RMSNorm weights in the layout ttnn's norm reads: rows of one tile width.
    norm_weight = zeros(mesh, (1, 1, hidden // TILE, TILE), layout=ttnn.ROW_MAJOR_LAYOUT)
    wqkv = zeros(mesh, (1, 1, hidden, (heads + 2 * kv_heads) * head_dim), attention_dtype)
    wo = zeros(mesh, (1, 1, heads * head_dim, hidden), attention_dtype)
    # Split over the mesh: gate and up by output columns, down by input rows.
    w_gate = zeros(mesh, (1, 1, hidden, ffn), mlp_dtype, shard_dim=3 if split else None)
    w_up = zeros(mesh, (1, 1, hidden, ffn), mlp_dtype, shard_dim=3 if split else None)
    w_down = zeros(mesh, (1, 1, ffn, hidden), mlp_dtype, shard_dim=2 if split else None)

    blocks = BATCH * BLOCKS_PER_USER
    k_cache = zeros(mesh, (blocks, kv_heads, BLOCK_TOKENS, head_dim), kv_dtype)
    v_cache = zeros(mesh, (blocks, kv_heads, BLOCK_TOKENS, head_dim), kv_dtype)
    page_table = zeros(mesh, (BATCH, BLOCKS_PER_USER), ttnn.int32, layout=ttnn.ROW_MAJOR_LAYOUT)
    positions = zeros(mesh, (BATCH,), ttnn.int32, layout=ttnn.ROW_MAJOR_LAYOUT)

    # Rotary inputs for decode: one [TILE, head_dim] cos/sin slice and one TILE x TILE transformation
    # matrix per user, each user on its own core.
    rope_config = height_sharded((TILE, head_dim))
    cos = zeros(mesh, (1, BATCH, TILE, head_dim), memory_config=rope_config)
    sin = zeros(mesh, (1, BATCH, TILE, head_dim), memory_config=rope_config)
    trans_mat = zeros(mesh, (1, 1, BATCH * TILE, TILE), memory_config=height_sharded((TILE, TILE)))

    x = zeros(mesh, (1, 1, BATCH, hidden))

    h = ttnn.rms_norm(x, epsilon=config.rms_norm_eps, weight=norm_weight)
    qkv = ttnn.linear(h, wqkv)
    q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
        qkv, num_heads=heads, num_kv_heads=kv_heads, memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG
    )
    q = ttnn.experimental.rotary_embedding_llama(q, cos, sin, trans_mat, is_decode_mode=True)
    k = ttnn.experimental.rotary_embedding_llama(k, cos, sin, trans_mat, is_decode_mode=True)
    ttnn.experimental.paged_update_cache(k_cache, k, update_idxs_tensor=positions, page_table=page_table)
    ttnn.experimental.paged_update_cache(v_cache, v, update_idxs_tensor=positions, page_table=page_table)
    scores = ttnn.transformer.paged_scaled_dot_product_attention_decode(
        q, k_cache, v_cache, page_table, cur_pos_tensor=positions, scale=head_dim**-0.5
    )
    # Concat-heads reads one user's [padded heads, head_dim] block per core.
    scores = ttnn.to_memory_config(scores, height_sharded((TILE, head_dim)))
    attention = ttnn.experimental.nlp_concat_heads_decode(scores, num_heads=heads)
    attention_out = ttnn.linear(ttnn.sharded_to_interleaved(attention, ttnn.L1_MEMORY_CONFIG), wo)
    h = ttnn.add(x, attention_out)

    h_norm = ttnn.rms_norm(h, epsilon=config.rms_norm_eps, weight=norm_weight)
    gated = ttnn.mul(
        ttnn.linear(h_norm, w_gate),
        ttnn.linear(h_norm, w_up),
        input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
    )
    mlp = ttnn.linear(gated, w_down)
    if split:
        # Each chip holds a partial sum of the whole hidden vector.
        mlp = ttnn.reduce_scatter(mlp, dim=3, topology=ttnn.Topology.Linear)
        mlp = ttnn.all_gather(mlp, dim=3, topology=ttnn.Topology.Linear)
    return DecodeLayerRun(output=ttnn.add(h, mlp), attention=attention, mlp=mlp)


# The smallest Llama shape the decode kernels tile: 4/2 heads of 32 (one tile), hidden 128, and a
# vocabulary that is not a whole number of tiles, so the LM head's padding is exercised.
TINY = ModelConfig(
    name="tiny-llama",
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=BLOCK_TOKENS * BLOCKS_PER_USER,
    tie_word_embeddings=False,
)


def random_weights(
    config: ModelConfig, seed: int = 0, num_layers: int | None = None
) -> dict[str, np.ndarray]:
    """Canonical float32 weights of `config` (ttedge.checkpoint.base names and `[out, in]` layout).

    ttedge.checkpoint.base.canonical_shapes imports torch, which .venv-tt lacks, so the shapes are spelled
    out here. Every layer shares one set of arrays: the port prepares and converts each layer on its own,
    and real-shaped weights for all 30 SmolLM2 layers would cost 0.4 GB of host memory for nothing.
    """
    rng = np.random.default_rng(seed)
    h, ff, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size

    def normal(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    layer = {
        "attn_norm.weight": 1 + normal(h),
        "attn.q.weight": normal(q, h),
        "attn.k.weight": normal(kv, h),
        "attn.v.weight": normal(kv, h),
        "attn.o.weight": normal(h, q),
        "mlp_norm.weight": 1 + normal(h),
        "mlp.gate.weight": normal(ff, h),
        "mlp.up.weight": normal(ff, h),
        "mlp.down.weight": normal(h, ff),
    }
    weights = {"embed.weight": normal(config.vocab_size, h), "norm.weight": 1 + normal(h)}
    for i in range(config.num_layers if num_layers is None else num_layers):
        weights.update({f"layers.{i}.{name}": array for name, array in layer.items()})
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = normal(config.vocab_size, h)
    return weights


def decode_page_table() -> tuple[np.ndarray, int]:
    """A page table giving each of the BATCH users its own BLOCKS_PER_USER blocks, in a shuffled order as
    an allocator would hand them out, and the number of blocks."""
    blocks = BATCH * BLOCKS_PER_USER
    order = np.random.default_rng(1).permutation(blocks).astype(np.int32)
    return order.reshape(BATCH, BLOCKS_PER_USER), blocks
