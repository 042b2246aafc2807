"""One tensor-parallel shard's view of a checkpoint: the weights ``ethernet_mesh.sharding`` assigns to a
rank, under the canonical names, with a config of the shard's own head counts and MLP width.

``LlamaModel.from_checkpoint`` builds a shard's model from this view unchanged; the model's
``ShardGroup`` then adds the collectives. Tensors are sliced when loaded, so a rank never holds more of
a checkpoint than its shard (the file itself is memory-mapped by the readers). GGUF blocks are sliced
as blocks where the split falls on block boundaries, so a shard's int4 weights are the same codes the
single-process model repacks, not a requantisation.
"""

from __future__ import annotations

import dataclasses

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ttedge.checkpoint.base import Checkpoint, QuantizedBlocks, TensorSource
from ttedge.ethernet_mesh.sharding import Slice2d, TensorParallelPlan

# The plan's weight names and the canonical tensors they cover ("{i}": every layer).
_PLAN_TENSORS = {
    "embedding": "embed.weight",
    "input_norm": "layers.{i}.attn_norm.weight",
    "q": "layers.{i}.attn.q.weight",
    "k": "layers.{i}.attn.k.weight",
    "v": "layers.{i}.attn.v.weight",
    "o": "layers.{i}.attn.o.weight",
    "post_attention_norm": "layers.{i}.mlp_norm.weight",
    "gate": "layers.{i}.mlp.gate.weight",
    "up": "layers.{i}.mlp.up.weight",
    "down": "layers.{i}.mlp.down.weight",
    "final_norm": "norm.weight",
    "lm_head": "lm_head.weight",
}


def shard_config_of(plan: TensorParallelPlan) -> dict[str, int | bool]:
    """The config fields a shard's model sees: its own heads and MLP width, and an LM head of its own
    (a vocabulary slice, no longer the replicated embedding table)."""
    return {
        "num_heads": plan.query_heads_per_device,
        "num_kv_heads": plan.kv_heads_per_device,
        "intermediate_size": plan.config.intermediate_size // plan.devices,
        "tie_word_embeddings": False,
    }


def shard_checkpoint(checkpoint: Checkpoint, plan: TensorParallelPlan, rank: int) -> Checkpoint:
    """``rank``'s shard of ``checkpoint`` under ``plan``: every tensor the model needs, sliced."""
    if not 0 <= rank < plan.devices:
        raise ValueError(f"rank {rank} is not in a tensor-parallel group of {plan.devices}")
    config = checkpoint.config
    tensors: dict[str, TensorSource] = {}
    for shard in plan.weights:
        pattern = _PLAN_TENSORS[shard.name]
        names = [pattern.format(i=i) for i in range(config.num_layers)] if "{i}" in pattern else [pattern]
        for name in names:
            stored = name
            if shard.name == "lm_head" and config.tie_word_embeddings:
                stored = "embed.weight"
            tensors[name] = _sliced(checkpoint[stored], name, shard.slice_of(rank))
    if "rope.freq_factors" in checkpoint.tensors:
        tensors["rope.freq_factors"] = checkpoint.tensors["rope.freq_factors"]
    shard_name = f"{config.name} (tensor-parallel shard {rank + 1} of {plan.devices})"
    shard_config = dataclasses.replace(config, name=shard_name, **shard_config_of(plan))  # type: ignore[arg-type]
    return dataclasses.replace(checkpoint, config=shard_config, tensors=tensors)


def _sliced(source: TensorSource, name: str, part: Slice2d | None) -> TensorSource:
    if part is None:
        return dataclasses.replace(source, name=name)
    if len(source.shape) != 2:
        raise ValueError(
            f"{source.file} [tensor {source.name}]: a split weight must be 2-D, not {source.shape}"
        )
    (r0, r1), (c0, c1) = part.rows, part.cols

    def load() -> torch.Tensor:
        return source.load()[r0:r1, c0:c1].contiguous()

    def blocks() -> QuantizedBlocks | None:
        whole = source.quantized_blocks()
        if whole is None:
            return None
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[whole.qtype]]
        if c0 % block_size or c1 % block_size:
            return None  # a split through the middle of a block has no blocks: it is loaded dequantised
        data = whole.data[r0:r1, c0 // block_size * block_bytes : c1 // block_size * block_bytes]
        return QuantizedBlocks(whole.qtype, data, part.shape)

    return TensorSource(
        name=name,
        shape=part.shape,
        stored_dtype=source.stored_dtype,
        file=source.file,
        _loader=load,
        _blocks=blocks,
    )
