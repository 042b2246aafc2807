"""Tensor-parallel sharding plan for a Llama model over N devices (the 1×N convention of tt-metal's
models/tt_transformers): QKV, w1 (gate) and w3 (up) column-parallel, split over their output features;
WO and w2 (down) row-parallel, split over their input features, each followed by an all-reduce of the
residual-stream update; norms replicated; KV heads replicated when there are fewer of them than devices;
the LM head split over the vocabulary, its logits all-gathered.

Weight shapes are (output features, input features), as in Hugging Face checkpoints.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ttedge.config import ModelConfig

from .collectives import Collective, collective_seconds
from .topology import Mesh


class ShardingError(ValueError):
    """A model that cannot be split over that many devices; the message lists every dimension at fault."""


class Split(enum.Enum):
    REPLICATED = "replicated"
    OUTPUT_FEATURES = "output features (column-parallel)"
    INPUT_FEATURES = "input features (row-parallel)"
    VOCABULARY = "vocabulary"


@dataclass(frozen=True)
class Slice2d:
    """Rows ``rows`` and columns ``cols`` (half-open ranges) of a 2-D weight."""

    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


@dataclass(frozen=True)
class WeightShard:
    name: str
    shape: tuple[int, ...]
    split: Split
    per_device_shape: tuple[int, ...]
    # How many devices hold each distinct slice: 1 when fully split, N when replicated, N / KV heads for
    # K and V when there are fewer KV heads than devices.
    copies: int

    def slice_of(self, device: int) -> Slice2d | None:
        """The part of the whole weight ``device`` holds; None for a replicated (whole) tensor."""
        if self.split is Split.REPLICATED:
            return None
        out_features, in_features = self.shape
        local_out, local_in = self.per_device_shape
        if self.split is Split.INPUT_FEATURES:
            return Slice2d((0, out_features), (device * local_in, (device + 1) * local_in))
        # Split over output rows (column-parallel, or the vocabulary): ``copies`` consecutive devices hold
        # the same slice, which keeps each device's query heads next to the KV head they share.
        index = device // self.copies
        return Slice2d((index * local_out, (index + 1) * local_out), (0, in_features))


@dataclass(frozen=True)
class CollectiveCall:
    """One collective a forward pass issues ``count`` times, over a tensor of ``bytes`` (full size)."""

    where: str
    collective: Collective
    bytes: int
    count: int

    def seconds(self, mesh: Mesh) -> float:
        return self.count * collective_seconds(self.collective, self.bytes, mesh)


@dataclass(frozen=True)
class TensorParallelPlan:
    config: ModelConfig
    devices: int
    weights: tuple[WeightShard, ...]
    query_heads_per_device: int
    kv_heads_per_device: int
    kv_head_copies: int

    def weight(self, name: str) -> WeightShard:
        for shard in self.weights:
            if shard.name == name:
                return shard
        raise KeyError(f"no weight {name!r} (have: {', '.join(s.name for s in self.weights)})")

    def collectives(
        self, layer_tokens: int, logit_rows: int, bytes_per_element: int = 2
    ) -> tuple[CollectiveCall, ...]:
        """The collectives of one forward pass over ``layer_tokens`` tokens that produces logits for
        ``logit_rows`` of them; none on a single device."""
        if self.devices == 1:
            return ()
        residual_update = layer_tokens * self.config.hidden_size * bytes_per_element
        layers = self.config.num_layers
        return (
            CollectiveCall("attention output (after WO)", Collective.ALL_REDUCE, residual_update, layers),
            CollectiveCall("MLP output (after w2)", Collective.ALL_REDUCE, residual_update, layers),
            CollectiveCall(
                "logits (after the LM head)",
                Collective.ALL_GATHER,
                logit_rows * self.config.vocab_size * bytes_per_element,
                1,
            ),
        )

    def decode_collectives(self, batch: int, bytes_per_element: int = 2) -> tuple[CollectiveCall, ...]:
        """One decode step: one new token per sequence, logits for each."""
        return self.collectives(batch, batch, bytes_per_element)

    def prefill_collectives(self, tokens: int, bytes_per_element: int = 2) -> tuple[CollectiveCall, ...]:
        """Prefill of one prompt of ``tokens`` tokens: logits only for its last position."""
        return self.collectives(tokens, 1, bytes_per_element)


def plan_tensor_parallel(config: ModelConfig, devices: int) -> TensorParallelPlan:
    """The plan for ``config`` at TP degree ``devices``; raises ShardingError naming every split that
    does not divide."""
    if devices < 1:
        raise ShardingError(f"{config.name}: TP degree must be at least 1, got {devices}")
    problems = []
    if config.num_heads % devices:
        problems.append(f"{config.num_heads} query heads do not divide over {devices} devices")
    kv = config.num_kv_heads
    if kv >= devices and kv % devices:
        problems.append(f"{kv} KV heads do not divide over {devices} devices")
    if kv < devices and devices % kv:
        problems.append(
            f"{kv} KV heads cannot be replicated evenly over {devices} devices"
            f" ({devices} is not a multiple of {kv})"
        )
    if config.intermediate_size % devices:
        problems.append(f"MLP width {config.intermediate_size} does not divide over {devices} devices")
    if config.vocab_size % devices:
        problems.append(f"vocabulary of {config.vocab_size} does not divide over {devices} devices (pad it)")
    if problems:
        raise ShardingError(f"{config.name} at TP={devices}: " + "; ".join(problems))

    hidden, head_dim = config.hidden_size, config.head_dim
    kv_per_device = max(kv // devices, 1)
    kv_copies = max(devices // kv, 1)

    def column(name: str, out_features: int, per_device_out: int, copies: int = 1) -> WeightShard:
        return WeightShard(
            name, (out_features, hidden), Split.OUTPUT_FEATURES, (per_device_out, hidden), copies
        )

    def row(name: str, in_features: int) -> WeightShard:
        return WeightShard(
            name, (hidden, in_features), Split.INPUT_FEATURES, (hidden, in_features // devices), 1
        )

    def replicated(name: str, shape: tuple[int, ...]) -> WeightShard:
        return WeightShard(name, shape, Split.REPLICATED, shape, devices)

    weights = (
        # The embedding lookup is a gather of rows: replicating the table keeps the residual stream whole
        # on every device without a collective before the first layer.
        replicated("embedding", (config.vocab_size, hidden)),
        replicated("input_norm", (hidden,)),
        column("q", config.q_size, config.q_size // devices),
        column("k", config.kv_size, kv_per_device * head_dim, kv_copies),
        column("v", config.kv_size, kv_per_device * head_dim, kv_copies),
        row("o", config.q_size),
        replicated("post_attention_norm", (hidden,)),
        column("gate", config.intermediate_size, config.intermediate_size // devices),
        column("up", config.intermediate_size, config.intermediate_size // devices),
        row("down", config.intermediate_size),
        replicated("final_norm", (hidden,)),
        # With tied embeddings this is each device's vocabulary slice of the (replicated) embedding table.
        WeightShard(
            "lm_head",
            (config.vocab_size, hidden),
            Split.VOCABULARY,
            (config.vocab_size // devices, hidden),
            1,
        ),
    )
    return TensorParallelPlan(
        config=config,
        devices=devices,
        weights=weights,
        query_heads_per_device=config.num_heads // devices,
        kv_heads_per_device=kv_per_device,
        kv_head_copies=kv_copies,
    )
