"""Grouped-query attention over a paged KV cache, decode and prefill (tt_transformers' ``attention.py``).

Decode, one token per slot, 32 slots (users, or consecutive positions of one user): fused QKV linear,
split into heads one slot per core, rotary embedding (Meta pair order, see ``rope.py``), K and V written
into the paged cache at each slot's position through the page table, paged SDPA decode over each slot's
blocks, heads concatenated, output projection.

Prefill, a run of tokens of one user (``forward_prefill``): the same fused QKV linear over every row,
heads split in DRAM, rotary embedding in prefill mode, K and V copied block by block into the cache
through the user's page table (``paged_fill_cache``), then causal attention: over the chunk itself when it
starts the sequence, or over the cache through the page table when earlier chunks are already there
(``chunked_scaled_dot_product_attention``); heads concatenated, output projection.

On a mesh each chip runs this over its own heads (``tensor_parallel.py``): its query heads, the KV heads
they attend with (its own KV cache holds only those), and its rows of the output projection, whose result
is the chip's part of a sum the decoder layer all-reduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.linear import DramShardedLinear
from ttedge.models.llama.tt.model_config import (
    ACTIVATIONS_MEMORY,
    BLOCK_TOKENS,
    PREFILL_MEMORY,
    TILE,
    WEIGHTS_MEMORY,
    DeviceSpec,
)
from ttedge.models.llama.tt.rope import RotaryInputs, RotarySetup
from ttedge.models.llama.tt.tensor_parallel import TensorParallel, single_chip
from ttedge.models.llama.tt.ttlang import Rotary
from ttedge.models.llama.tt.weights import LayerTensors, device_tensor, host_tensor


@dataclass(frozen=True)
class DecodeInputs:
    """Per-step inputs every layer shares."""

    positions: ttnn.Tensor  # [BATCH] int32: the position of each slot's token, the last one it attends to
    page_table: ttnn.Tensor  # [BATCH, blocks_per_user] int32: cache block of each slot's logical block
    rotary: RotaryInputs
    # [BATCH] int32 each: the K/V cache updates, in order, each writing every slot at its index or, at -1,
    # leaving it alone; ``(positions,)`` when every slot is a different user. Slots of one user at
    # consecutive positions (drafts verified in one step) go in separate updates: each slot's core rewrites
    # the whole cache tiles holding its row, all at once (tt_host.DecodeBatch).
    cache_updates: Sequence[ttnn.Tensor]

    @classmethod
    def one_user_per_slot(
        cls, mesh: ttnn.MeshDevice, rope: RotarySetup, positions: np.ndarray, page_table: np.ndarray
    ) -> DecodeInputs:
        """The inputs of a decode step where each slot is a different user, from host arrays: ``positions``
        ``[BATCH]`` int32, ``page_table`` ``[BATCH, blocks_per_user]`` int32."""
        positions_tensor = host_tensor(positions, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(mesh)
        return cls(
            positions=positions_tensor,
            page_table=host_tensor(page_table, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(mesh),
            rotary=rope.for_positions(positions),
            cache_updates=(positions_tensor,),
        )


@dataclass(frozen=True)
class PrefillInputs:
    """Inputs every layer shares for one prefill chunk of one user."""

    start: int  # position of the chunk's first token, a multiple of BLOCK_TOKENS
    fill_page_table: ttnn.Tensor  # [1, chunk blocks] int32: where the chunk's K/V go, block by block
    page_table: ttnn.Tensor  # [1, blocks_per_user] int32: the user's whole table, read when start > 0
    rotary: RotaryInputs


class Attention:
    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        spec: DeviceSpec,
        config: ModelConfig,
        layer: LayerTensors,
        kv_dtype: ttnn.DataType,
        num_blocks: int,
        tp: TensorParallel | None = None,
        rotary_kernel: bool = False,
    ):
        """``tp``: the tensor-parallel plan the weights were split by (default: one chip).
        ``rotary_kernel``: decode rotates Q and K with the TT-Lang kernel (``ttlang.Rotary``)."""
        plan = (tp or single_chip(config)).plan
        self.spec = spec
        self.num_heads, self.num_kv_heads = plan.query_heads_per_device, plan.kv_heads_per_device
        # The kernels take a float32 scale. ttnn 0.81.1's chunked prefill SDPA refuses a Python float that
        # float32 cannot hold exactly ("incompatible function arguments" for 32**-0.5), so round it first.
        self.scale = float(np.float32(config.head_dim**-0.5))
        self.wqkv = DramShardedLinear(mesh, spec, layer.wqkv)
        self.wo = DramShardedLinear(mesh, spec, layer.wo)
        # The paged cache: [blocks, kv_heads, block_tokens, head_dim], shared by all users via page tables.
        cache = np.zeros((num_blocks, self.num_kv_heads, BLOCK_TOKENS, config.head_dim), np.float32)
        self.k_cache = device_tensor(mesh, cache, kv_dtype, WEIGHTS_MEMORY)
        self.v_cache = device_tensor(mesh, cache, kv_dtype, WEIGHTS_MEMORY)
        # Concat-heads reads one user's [padded heads, head_dim] block per core.
        self.heads_memory = spec.height_sharded((TILE, config.head_dim))
        self.rotary = Rotary(mesh, config.head_dim, rotary_kernel)

    def __call__(self, x: ttnn.Tensor, step: DecodeInputs) -> ttnn.Tensor:
        qkv = ttnn.sharded_to_interleaved(self.wqkv(x), ACTIVATIONS_MEMORY)
        q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
            qkv,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG,
        )
        q, k = self.rotary(q, k, step.rotary)
        for update in step.cache_updates:
            for cache, new in ((self.k_cache, k), (self.v_cache, v)):
                ttnn.experimental.paged_update_cache(
                    cache, new, update_idxs_tensor=update, page_table=step.page_table
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

    def prefill(self, x: ttnn.Tensor, step: PrefillInputs) -> ttnn.Tensor:
        """``x`` is ``[1, 1, seq_len, hidden]`` in DRAM (``seq_len`` tile-padded); returns the same shape."""
        seq_len = x.shape[-2]
        q, k, v = ttnn.experimental.nlp_create_qkv_heads(
            self.wqkv.prefill(x),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            transpose_k_heads=False,
            memory_config=PREFILL_MEMORY,
        )
        rot = step.rotary
        q = ttnn.experimental.rotary_embedding_llama(q, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=False)
        k = ttnn.experimental.rotary_embedding_llama(k, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=False)
        # paged_fill_cache copies tiles as they are (unlike paged_update_cache, it does not convert): K and V
        # go to the cache's dtype first, and causal attention then reads them in that dtype as decode will.
        if k.dtype != self.k_cache.dtype:
            k, v = ttnn.typecast(k, self.k_cache.dtype), ttnn.typecast(v, self.v_cache.dtype)
        for cache, new in ((self.k_cache, k), (self.v_cache, v)):
            ttnn.experimental.paged_fill_cache(cache, new, step.fill_page_table, batch_idx=0)
        program = self.spec.sdpa_prefill_program(seq_len, step.start)
        if step.start == 0:
            scores = ttnn.transformer.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                scale=self.scale,
                program_config=program,
                memory_config=PREFILL_MEMORY,
            )
        else:
            scores = ttnn.transformer.chunked_scaled_dot_product_attention(
                q,
                self.k_cache,
                self.v_cache,
                step.page_table,
                step.start,
                scale=self.scale,
                program_config=program,
                memory_config=PREFILL_MEMORY,
            )
        heads = ttnn.experimental.nlp_concat_heads(scores, memory_config=PREFILL_MEMORY)
        return self.wo.prefill(heads)
