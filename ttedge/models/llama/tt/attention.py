"""Grouped-query attention in decode mode over a paged KV cache (tt_transformers' ``attention.py``).

One token per user, 32 users: fused QKV linear, split into heads one user per core, rotary embedding
(Meta pair order, see ``rope.py``), K and V written into the paged cache at each user's position through
the page table, paged SDPA decode over each user's blocks, heads concatenated, output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.linear import DramShardedLinear
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, BLOCK_TOKENS, TILE, DeviceSpec
from ttedge.models.llama.tt.rope import RotaryInputs
from ttedge.models.llama.tt.weights import HostLayer, WeightDtypes, device_weight


@dataclass(frozen=True)
class DecodeInputs:
    """Per-step inputs every layer shares."""

    positions: ttnn.Tensor  # [BATCH] int32: the position each user's new token is written at
    page_table: ttnn.Tensor  # [BATCH, blocks_per_user] int32: cache block of each user's logical block
    rotary: RotaryInputs


class Attention:
    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        spec: DeviceSpec,
        config: ModelConfig,
        layer: HostLayer,
        dtypes: WeightDtypes,
        num_blocks: int,
    ):
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.scale = config.head_dim**-0.5
        self.wqkv = DramShardedLinear(mesh, spec, layer.wqkv, dtypes.attention)
        self.wo = DramShardedLinear(mesh, spec, layer.wo, dtypes.attention)
        # The paged cache: [blocks, kv_heads, block_tokens, head_dim], shared by all users via page tables.
        cache = np.zeros((num_blocks, config.num_kv_heads, BLOCK_TOKENS, config.head_dim), np.float32)
        self.k_cache = device_weight(mesh, cache, dtypes.kv_cache)
        self.v_cache = device_weight(mesh, cache, dtypes.kv_cache)
        # Concat-heads reads one user's [padded heads, head_dim] block per core.
        self.heads_memory = spec.height_sharded((TILE, config.head_dim))

    def __call__(self, x: ttnn.Tensor, step: DecodeInputs) -> ttnn.Tensor:
        qkv = ttnn.sharded_to_interleaved(self.wqkv(x), ACTIVATIONS_MEMORY)
        q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
            qkv,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG,
        )
        rot = step.rotary
        q = ttnn.experimental.rotary_embedding_llama(q, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=True)
        k = ttnn.experimental.rotary_embedding_llama(k, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=True)
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            ttnn.experimental.paged_update_cache(
                cache, new, update_idxs_tensor=step.positions, page_table=step.page_table
            )
        scores = ttnn.transformer.paged_scaled_dot_product_attention_decode(
            q,
            self.k_cache,
            self.v_cache,
            step.page_table,
            cur_pos_tensor=step.positions,
            scale=self.scale,
            memory_config=ACTIVATIONS_MEMORY,
        )
        scores = ttnn.to_memory_config(scores, self.heads_memory)
        heads = ttnn.experimental.nlp_concat_heads_decode(scores, num_heads=self.num_heads)
        return ttnn.sharded_to_interleaved(self.wo(heads), ACTIVATIONS_MEMORY)
