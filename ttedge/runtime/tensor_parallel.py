"""Tensor parallelism on CPU: ``ethernet_mesh``'s sharding plan realised over ``torch.distributed`` (gloo)
processes, the CPU twin of the TT backend's mesh tensors and CCL ops.

Every rank holds one shard of the weights (``shard_checkpoint``) and the KV cache of its own KV heads.
Rank 0 runs everything else — server, scheduler, strategies, sampler — and its runner
(``TensorParallelRunner``) broadcasts each step's inputs before running its own shard; the other ranks
(``run_worker``) wait for those inputs and run theirs. Inside the forward, the row-parallel projections
are completed by an all-reduce and the logits gathered over the vocabulary (``GlooShardGroup``), so every
rank ends a step with the same logits and rank 0 samples from them.

Ranks find each other through torch.distributed's environment rendezvous (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): ``ttedge launch`` sets them, as does ``torchrun``, on one machine or
several.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ttedge.checkpoint.base import Checkpoint
from ttedge.config import ConfigError, ModelConfig
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.models.llama.linear import WeightFormat
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import GreedyOnDevice, ModelRunner, StepInput, VerifiesGreedyOnDevice
from ttedge.runtime.kv_cache import BlockAllocator
from ttedge.runtime.shard_checkpoint import shard_checkpoint

log = logging.getLogger(__name__)

# Ranks other than 0 wait in a broadcast for as long as the server is idle; a dead peer still ends the
# wait at once (its sockets close), so the timeout only has to outlast idleness.
_IDLE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Rendezvous:
    """Where this process sits in a tensor-parallel group, from torch.distributed's environment."""

    rank: int
    world_size: int
    # Ranks on this machine, which share its cores.
    local_world_size: int

    @classmethod
    def from_environ(cls) -> Rendezvous | None:
        """The group this process was started in, or None outside one (or in a group of one)."""
        env = os.environ
        # torch.distributed's names (ttedge launch, torchrun), else Open MPI's (tt-run starts mpirun).
        world_size = int(env.get("WORLD_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or 1)
        if world_size <= 1:
            return None
        rank = env.get("RANK") or env.get("OMPI_COMM_WORLD_RANK")
        if rank is None:
            raise ConfigError("tensor parallelism", f"WORLD_SIZE is {world_size} but RANK is not set")
        local = int(env.get("LOCAL_WORLD_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or world_size)
        return cls(int(rank), world_size, local)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def threads(self) -> int:
        """Intra-op threads per rank: this machine's cores shared out, at least one."""
        return max(1, (os.cpu_count() or 1) // self.local_world_size)


class GlooShardGroup:
    """The model's ``ShardGroup`` over the default torch.distributed process group.

    Partial sums are reduced in float32: each shard's bfloat16 partial is exact in float32, and the
    stream then rounds once, as the single-process model does after its one matmul.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        total = partial.float()
        dist.all_reduce(total)
        return total

    def gather_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits.contiguous())
        return torch.cat(parts, dim=-1)


def join_group(rendezvous: Rendezvous) -> GlooShardGroup:
    """Join the group (blocks until every rank has); a ConfigError names what is missing."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        message = f"rank {rendezvous.rank} of {rendezvous.world_size}: {', '.join(missing)} not set"
        raise ConfigError("tensor parallelism", message)
    if not dist.is_initialized():
        dist.init_process_group(
            "gloo", rank=rendezvous.rank, world_size=rendezvous.world_size, timeout=_IDLE_TIMEOUT
        )
    return GlooShardGroup(rendezvous.world_size)


def leave_group() -> None:
    # Explicitly: a gloo group still alive when the interpreter exits can abort the process from its C++
    # threads ("terminate called without an active exception") after a clean run.
    dist.destroy_process_group()


def load_shard(
    checkpoint: Checkpoint,
    rendezvous: Rendezvous,
    weight_format: WeightFormat | str,
    batch_invariant: bool = False,
) -> LlamaModel:
    """This rank's shard of the model, with its group joined. The plan is checked before the group is
    joined, so that a split that does not divide fails on every rank at once with the same message."""
    plan = plan_tensor_parallel(checkpoint.config, rendezvous.world_size)
    group = join_group(rendezvous)
    shard = shard_checkpoint(checkpoint, plan, rendezvous.rank)
    return LlamaModel.from_checkpoint(
        shard, weight_format, batch_invariant=batch_invariant, shard_group=group
    )


class TensorParallelRunner:
    """Rank 0's ``ModelRunner``: each step's call goes to every rank, then rank 0's own runner makes it.

    ``local`` is this rank's runner: a CPU shard (``load_shard``), or, on a TT mesh spread over several
    hosts, the TT runner of the whole mesh, whose ops every host's process must issue alike (SPMD). The
    block tables are rank 0's alone (its allocator); every rank's cache has as many blocks, holding its
    own KV heads at the same slots.
    """

    def __init__(self, local: ModelRunner, config: ModelConfig):
        self.local = local
        self.config = config  # the whole model's, which the engine sees
        self.allocator: BlockAllocator = local.allocator
        self.max_model_len = local.max_model_len
        self.cheap_rows = local.cheap_rows

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        return self._step("run", inputs)

    def _step(self, method: str, *args: object) -> Any:
        dist.broadcast_object_list([(method, args)], src=0)
        return getattr(self.local, method)(*args)

    def close(self) -> None:
        """Let the other ranks leave their loop, then leave the group."""
        dist.broadcast_object_list([None], src=0)
        leave_group()


class GreedyTensorParallelRunner(TensorParallelRunner):
    """Over a runner that picks greedy tokens on its device (``GreedyOnDevice``)."""

    def run_greedy(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        return self._step("run_greedy", inputs)


class VerifyingTensorParallelRunner(GreedyTensorParallelRunner):
    """Over a runner that also verifies greedy drafts on its device (``VerifiesGreedyOnDevice``)."""

    def run_greedy_verify(self, inputs: list[StepInput], drafts: list[list[int]]) -> list[tuple[int, int]]:
        return self._step("run_greedy_verify", inputs, drafts)


def driver_runner(local: ModelRunner, config: ModelConfig) -> TensorParallelRunner:
    """Rank 0's runner over ``local``, offering the engine what ``local`` offers."""
    if isinstance(local, VerifiesGreedyOnDevice):
        return VerifyingTensorParallelRunner(local, config)
    if isinstance(local, GreedyOnDevice):
        return GreedyTensorParallelRunner(local, config)
    return TensorParallelRunner(local, config)


def run_worker(local: ModelRunner) -> None:
    """A rank other than 0: make each call rank 0 broadcasts, on this rank's runner, until it sends None."""
    while True:
        message: list[tuple[str, tuple[Any, ...]] | None] = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            leave_group()
            return
        method, args = message[0]
        getattr(local, method)(*args)
