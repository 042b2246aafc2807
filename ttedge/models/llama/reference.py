"""The torch implementation of the Llama family: the numerical golden and the CPU backend's model.

It runs a flat batch of new tokens from several sequences against a paged KV cache (see
``batch.py``), so one code path serves prefill, chunked prefill, batched decode and verification
of draft tokens. The math follows Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary
embeddings, RMSNorm in float32) so float32 outputs match it token for token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ttedge.checkpoint.base import Checkpoint, CheckpointError
from ttedge.config import ModelConfig
from ttedge.models.llama.batch import BatchLayout
from ttedge.models.llama.linear import (
    Linear,
    WeightFormat,
    WeightSource,
    build_linear,
    build_lm_head,
    weight_source,
)
from ttedge.runtime.kv_cache import CpuKVCache


def rope_inverse_frequencies(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies, with the model's rope scaling applied."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if freq_factors is not None:
        # GGUF stores llama3-style scaling as precomputed divisors (rope_freqs.weight).
        return inv_freq / freq_factors.float()
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables for every position the model supports, looked up per token.

    Hugging Face's rotate-half, ``x * cos + cat(-x2, x1) * sin``, is computed as
    ``x * cos + roll(x) * signed_sin`` with the sign folded into the table: the same products and the
    same sum, bit for bit, in four ops instead of seven.
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype):
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.cos = torch.cat((angles, angles), dim=-1).cos().to(dtype)
        self.signed_sin = torch.cat((-angles, angles), dim=-1).sin().to(dtype)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In one fused op, which normalises in float32 and rounds once at the end; Hugging Face also rounds
    # before the weight multiply, so low-precision streams differ from it by one rounding.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class ShardGroup(Protocol):
    """The collectives a tensor-parallel shard of the model needs (``ethernet_mesh.sharding``): its row-
    parallel projections (WO, w2) give partial sums of the residual-stream update, and its LM head the
    logits of its slice of the vocabulary."""

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of ``partial`` over every shard, in ``partial``'s dtype or wider: it is added into the
        residual stream, which rounds it once."""
        ...

    def gather_vocabulary(self, logits: torch.Tensor) -> torch.Tensor:
        """Every shard's ``logits`` [N, vocab / shards] side by side, in shard order: [N, vocab]."""
        ...


@dataclass
class DecoderLayer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    """A Llama-family decoder over a paged KV cache.

    Not an ``nn.Module``: inference never needs autograd or hooks, and plain attribute access keeps
    per-op Python overhead down, which matters at small-model sizes.
    """

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head: Linear,
        inv_freq: torch.Tensor,
        weight_format: WeightFormat,
        exit_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None,
        batch_invariant: bool = False,
        shard_group: ShardGroup | None = None,
    ):
        self.config = config
        self.weight_format = weight_format
        self.dtype = weight_format.activation_dtype
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        # Maps the last layer's hidden states to what the final norm expects; only a draft built from a
        # subset of a bigger model's layers has one (``layer_subset``).
        self.exit_adapter = exit_adapter
        self.inv_freq = inv_freq
        # Every token attends on its own (``_attention_row_by_row``), so its output never depends on
        # what else is in the batch; with a row-independent weight format the whole forward is then
        # batch-invariant (docs/speculative.md, "Exactness").
        self.batch_invariant = batch_invariant
        # One tensor-parallel shard of a bigger model when set: ``config`` and the weights are this
        # shard's (runtime/tensor_parallel.py), and the group completes the row-parallel sums.
        self.shard_group = shard_group
        self.rope = RotaryEmbedding(inv_freq, config.max_position_embeddings, self.dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        weight_format: WeightFormat | str = WeightFormat.float32,
        progress: Callable[[int, int], None] | None = None,
        batch_invariant: bool = False,
        shard_group: ShardGroup | None = None,
    ) -> LlamaModel:
        """``shard_group``: ``checkpoint`` holds one tensor-parallel shard's weights (see ``ShardGroup``)."""
        fmt = WeightFormat(weight_format)
        if batch_invariant and not fmt.row_independent:
            raise ValueError(
                f"a batch-invariant model needs row-independent weights (int4, int8), not {fmt.value}"
            )
        config = checkpoint.config
        dtype = fmt.activation_dtype

        def source(name: str) -> WeightSource:
            return weight_source(checkpoint[name])

        def linear(names: Sequence[str], is_lm_head: bool = False) -> Linear:
            try:
                if is_lm_head:
                    return build_lm_head(source(names[0]), fmt)
                return build_linear([source(n) for n in names], fmt)
            except (RuntimeError, ValueError) as err:
                raise CheckpointError(
                    checkpoint.path, f"cannot build {fmt.value} weights: {err}", names[0]
                ) from err

        def vector(name: str) -> torch.Tensor:
            return checkpoint.load(name).to(dtype)

        layers = []
        for i in range(config.num_layers):
            prefix = f"layers.{i}."
            layers.append(
                DecoderLayer(
                    attn_norm=vector(prefix + "attn_norm.weight"),
                    qkv=linear(
                        [prefix + "attn.q.weight", prefix + "attn.k.weight", prefix + "attn.v.weight"]
                    ),
                    o=linear([prefix + "attn.o.weight"]),
                    mlp_norm=vector(prefix + "mlp_norm.weight"),
                    gate_up=linear([prefix + "mlp.gate.weight", prefix + "mlp.up.weight"]),
                    down=linear([prefix + "mlp.down.weight"]),
                )
            )
            if progress is not None:
                progress(i + 1, config.num_layers)
        head_name = "embed.weight" if config.tie_word_embeddings else "lm_head.weight"
        freq_factors = checkpoint.tensors.get("rope.freq_factors")
        return cls(
            config=config,
            embed=checkpoint.load("embed.weight").to(dtype),
            layers=layers,
            norm=vector("norm.weight"),
            lm_head=linear([head_name], is_lm_head=True),
            inv_freq=rope_inverse_frequencies(config, None if freq_factors is None else freq_factors.load()),
            weight_format=fmt,
            batch_invariant=batch_invariant,
            shard_group=shard_group,
        )

    def layer_subset(
        self,
        layer_indices: Sequence[int],
        exit_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LlamaModel:
        """A shallower model made of some of this model's layers, in order, sharing every weight with it
        (no memory beyond its own KV cache): the self-speculative draft. ``exit_adapter`` maps its last
        layer's output towards what this model's last layer would give."""
        if self.shard_group is not None:
            # The draft runs on one process, and a shard's layers would wait for collectives there.
            raise ValueError(
                "a tensor-parallel shard has no layer subset: load the draft from the checkpoint"
            )
        if not layer_indices or list(layer_indices) != sorted(set(layer_indices)):
            raise ValueError(f"layer indices must be increasing and distinct, got {list(layer_indices)}")
        if layer_indices[0] < 0 or layer_indices[-1] >= len(self.layers):
            raise ValueError(f"layer indices must lie in [0, {len(self.layers)}), got {list(layer_indices)}")
        return LlamaModel(
            config=dataclasses.replace(self.config, num_layers=len(layer_indices)),
            embed=self.embed,
            layers=[self.layers[i] for i in layer_indices],
            norm=self.norm,
            lm_head=self.lm_head,
            inv_freq=self.inv_freq,
            weight_format=self.weight_format,
            exit_adapter=exit_adapter,
            batch_invariant=self.batch_invariant,
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, layout: BatchLayout, cache: CpuKVCache) -> torch.Tensor:
        """Run the new tokens ``input_ids`` [T] and return float32 logits [N, vocab] for
        ``layout.logits_indices``; writes their keys and values into ``cache``."""
        logits = self.lm_head(self.final_hidden(input_ids, layout, cache)).float()
        return logits if self.shard_group is None else self.shard_group.gather_vocabulary(logits)

    @torch.inference_mode()
    def final_hidden(self, input_ids: torch.Tensor, layout: BatchLayout, cache: CpuKVCache) -> torch.Tensor:
        """``forward`` up to the LM head: the final-norm hidden states [N, hidden] of
        ``layout.logits_indices``. The response-length predictor reads a prompt's representation here."""
        cfg = self.config
        num_tokens, num_sequences = input_ids.shape[0], layout.num_sequences
        cos = self.rope.cos[layout.positions].unsqueeze(1)
        signed_sin = self.rope.signed_sin[layout.positions].unsqueeze(1)
        kv_rows = cache.block_rows(layout.block_tables)
        rotated_width = cfg.q_size + cfg.kv_size
        x = self.embed[input_ids]
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, cfg.rms_norm_eps))
            # Q and K rotate together: one rotary call per layer on a view of the fused projection.
            qk = self.rope(
                qkv[:, :rotated_width].view(num_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim),
                cos,
                signed_sin,
            )
            q, k = qk.split((cfg.num_heads, cfg.num_kv_heads), dim=1)
            v = qkv[:, rotated_width:].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            cache.write(index, layout.slot_mapping, k, v)
            keys, values = cache.read(index, kv_rows, num_sequences, layout.context_len)
            x += self._complete(layer.o(self._attention(q, keys, values, layout)))
            gate, up = layer.gate_up(rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)).split(
                (cfg.intermediate_size, cfg.intermediate_size), dim=-1
            )
            x += self._complete(layer.down(F.silu(gate).mul_(up)))
        x = x[layout.logits_indices]
        if self.exit_adapter is not None:
            x = self.exit_adapter(x)
        return rms_norm(x, self.norm, cfg.rms_norm_eps)

    def _complete(self, update: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection's output: the whole update alone, a partial sum in a shard."""
        return update if self.shard_group is None else self.shard_group.all_reduce(update)

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: BatchLayout
    ) -> torch.Tensor:
        """``q`` [T, heads, head_dim] against ``keys`` and ``values`` [B, kv_heads, C, head_dim];
        returns [T, heads * head_dim]."""
        if self.batch_invariant:
            return self._attention_row_by_row(q, keys, values, layout)
        cfg = self.config
        batch = layout.num_sequences
        if layout.query_index is None:
            # One query per sequence: the query heads sharing a KV head become that head's queries,
            # so attention needs no GQA broadcast of K and V (1.7x faster at 32 sequences of 100 tokens,
            # scripts/bench_attention.py).
            queries = q.reshape(batch, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=layout.attn_mask, scale=self.scale
            )
            return out.reshape(batch, cfg.q_size)
        queries = q[layout.query_index].transpose(1, 2)  # [B, heads, Q, head_dim]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=layout.attn_mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(batch * layout.max_query_len, -1)
        return out if layout.output_index is None else out[layout.output_index]

    def _attention_row_by_row(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: BatchLayout
    ) -> torch.Tensor:
        """Each token alone against exactly the keys it may see: the same kernel call whether the token
        is prefilled, decoded or verified, padded or not. A Python loop over tokens, so slower; it is
        the price of outputs that do not depend on the batch."""
        cfg = self.config
        group = cfg.num_heads // cfg.num_kv_heads
        queries = q.view(-1, cfg.num_kv_heads, group, cfg.head_dim)
        rows = []
        for row, (sequence, position) in enumerate(
            zip(layout.token_sequence.tolist(), layout.positions.tolist(), strict=True)
        ):
            seen = slice(sequence, sequence + 1), slice(None), slice(0, position + 1)
            rows.append(
                F.scaled_dot_product_attention(
                    queries[row : row + 1], keys[seen], values[seen], scale=self.scale
                )
            )
        return torch.cat(rows).reshape(-1, cfg.q_size)
