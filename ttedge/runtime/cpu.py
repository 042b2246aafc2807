"""The CPU backend: the reference model over a paged KV cache in host memory."""

from __future__ import annotations

import torch

from ttedge.config import ModelConfig
from ttedge.models.llama.batch import BatchLayout, SequenceChunk
from ttedge.models.llama.linear import AUTO_INT4_MAX_ROWS, WeightFormat
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import StepInput
from ttedge.runtime.kv_cache import BLOCK_SIZE, BlockAllocator, CpuKVCache, KVCacheSpec


class CpuModelRunner:
    def __init__(self, model: LlamaModel, kv_cache_bytes: int, max_model_len: int | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        spec = KVCacheSpec(
            num_layers=self.config.num_layers,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=model.dtype,
        )
        num_blocks = kv_cache_bytes // spec.bytes_per_block()
        if num_blocks < 1:
            raise ValueError(
                f"a KV cache of {kv_cache_bytes} bytes holds no block of {BLOCK_SIZE} tokens "
                f"({spec.bytes_per_block()} bytes each for this model)"
            )
        self.cache = CpuKVCache(spec, num_blocks)
        self.allocator = BlockAllocator(num_blocks)
        self.cheap_rows = AUTO_INT4_MAX_ROWS if model.weight_format is WeightFormat.auto else None
        self.max_model_len = min(
            max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings
        )

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        layout = BatchLayout.build(
            [SequenceChunk(i.start, len(i.token_ids), i.block_table, i.all_logits) for i in inputs]
        )
        token_ids = torch.tensor([t for i in inputs for t in i.token_ids], dtype=torch.long)
        logits = self.model.forward(token_ids, layout, self.cache)
        counts = [len(i.token_ids) if i.all_logits else 1 for i in inputs]
        return list(logits.split(counts))
