"""Tensor parallelism of the port over a 1xN mesh: ``ethernet_mesh.sharding``'s plan realised with ttnn.

The weights are split on the host (``weights.shard_layer``, ``weights.shard_outer``) and placed one slice per
chip; each chip then runs the single-chip op sequence on its slice with per-chip head counts, and the
partial results meet in the collectives the plan lists:

- after the attention output projection (WO, row-parallel) and after the MLP's down projection (w2,
  row-parallel), an all-reduce of the residual-stream update, so every chip holds the whole residual stream
  and the norms, the embedding and the residual adds run replicated, as on one chip;
- after the LM head (split over the vocabulary), an all-gather of the logits over the vocabulary, so the
  host reads one chip's copy and greedy decoding picks the argmax on the device as on one chip.

tt_transformers (``models/tt_transformers/tt/ccl.py``, ``tt_all_reduce``) does the same sums on N300 and
T3K as a reduce-scatter after WO and w2, keeping the residual stream split over the hidden size, and an
all-gather of the norm's statistics (``distributed_norm.py``); together they move what one all-reduce moves.
This port keeps the plan's replicated residual stream and uses ttnn's own ``all_reduce``; its topology is
tt_transformers' choice: Ring where the chips close a ring (an 8-chip T3K), Linear otherwise.

On a single chip every collective is skipped: the op sequence is exactly the single-chip port's.
"""

from __future__ import annotations

from dataclasses import dataclass

import ttnn

from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.sharding import TensorParallelPlan, plan_tensor_parallel


@dataclass(frozen=True)
class TensorParallel:
    plan: TensorParallelPlan
    topology: ttnn.Topology

    @classmethod
    def over(cls, config: ModelConfig, devices: int, ring: bool = False) -> TensorParallel:
        """The plan for ``config`` on ``devices`` chips walked as a ring or a line; raises
        ``ShardingError`` when a split does not divide."""
        topology = ttnn.Topology.Ring if ring else ttnn.Topology.Linear
        return cls(plan_tensor_parallel(config, devices), topology)

    @property
    def devices(self) -> int:
        return self.plan.devices

    def all_reduce(self, x: ttnn.Tensor, memory_config: ttnn.MemoryConfig) -> ttnn.Tensor:
        """The sum of every chip's ``x`` on every chip; ``x`` itself on one chip."""
        if self.devices == 1:
            return x
        return ttnn.all_reduce(x, topology=self.topology, memory_config=memory_config)

    def all_gather(self, x: ttnn.Tensor, dim: int, memory_config: ttnn.MemoryConfig) -> ttnn.Tensor:
        """Every chip's ``x`` concatenated along ``dim`` in chip order, on every chip; ``x`` on one chip."""
        if self.devices == 1:
            return x
        return ttnn.all_gather(x, dim=dim, topology=self.topology, memory_config=memory_config)


def single_chip(config: ModelConfig) -> TensorParallel:
    """No tensor parallelism: the plan on one device, which issues no collective."""
    return TensorParallel.over(config, 1)


def first_chip(x: ttnn.Tensor) -> ttnn.Tensor:
    """Chip 0's copy of a device tensor every chip holds whole (the tensor itself on one chip): ttnn reads a
    multi-chip tensor back only through a mesh composer, which would concatenate the identical copies."""
    copies = ttnn.get_device_tensors(x)
    return x if len(copies) == 1 else copies[0]
