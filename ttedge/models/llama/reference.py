"""The torch implementation of the Llama family: the numerical golden and the CPU backend's model.

It runs a flat batch of new tokens from several sequences against a paged KV cache (see
``batch.py``), so one code path serves prefill, chunked prefill, batched decode and verification
of draft tokens. The math follows Hugging Face's ``LlamaForCausalLM`` (rotate-half rotary
embeddings, RMSNorm in float32) so float32 outputs match it token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttedge.checkpoint.base import Checkpoint, CheckpointError
from ttedge.config import ModelConfig
from ttedge.models.llama.batch import BatchLayout
from ttedge.models.llama.linear import Linear, WeightFormat, WeightSource, build_linear, weight_source
from ttedge.runtime.kv_cache import CpuKVCache

_LM_HEAD_FORMAT = {WeightFormat.int4: WeightFormat.int8, WeightFormat.auto: WeightFormat.int8}


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
    """cos/sin tables for every position the model supports, looked up per token."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype):
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        both = torch.cat((angles, angles), dim=-1)
        self.cos = both.cos().to(dtype)
        self.sin = both.sin().to(dtype)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Low-precision streams normalise in float32, as Hugging Face does, then round once.
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)) * weight


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
    ):
        self.config = config
        self.weight_format = weight_format
        self.dtype = weight_format.activation_dtype
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.rope = RotaryEmbedding(inv_freq, config.max_position_embeddings, self.dtype)
        self.scale = 1.0 / math.sqrt(config.head_dim)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        weight_format: WeightFormat | str = WeightFormat.float32,
        progress: Callable[[int, int], None] | None = None,
    ) -> LlamaModel:
        fmt = WeightFormat(weight_format)
        config = checkpoint.config
        dtype = fmt.activation_dtype

        def source(name: str) -> WeightSource:
            return weight_source(checkpoint[name])

        def linear(names: Sequence[str], fmt: WeightFormat = fmt) -> Linear:
            try:
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
            # The LM head stays at 8 bits under the 4-bit formats, as GGUF files keep it: requantising
            # SmolLM2's Q8_0 head to int4 drops top-1 agreement with float32 from 0.98 to 0.90.
            lm_head=linear([head_name], _LM_HEAD_FORMAT.get(fmt, fmt)),
            inv_freq=rope_inverse_frequencies(config, None if freq_factors is None else freq_factors.load()),
            weight_format=fmt,
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, layout: BatchLayout, cache: CpuKVCache) -> torch.Tensor:
        """Run the new tokens ``input_ids`` [T] and return float32 logits [N, vocab] for
        ``layout.logits_indices``; writes their keys and values into ``cache``."""
        return self.lm_head(self.final_hidden(input_ids, layout, cache)).float()

    @torch.inference_mode()
    def final_hidden(self, input_ids: torch.Tensor, layout: BatchLayout, cache: CpuKVCache) -> torch.Tensor:
        """``forward`` up to the LM head: the final-norm hidden states [N, hidden] of
        ``layout.logits_indices``. The response-length predictor reads a prompt's representation here."""
        cfg = self.config
        num_tokens = input_ids.shape[0]
        cos = self.rope.cos[layout.positions].unsqueeze(1)
        sin = self.rope.sin[layout.positions].unsqueeze(1)
        x = self.embed[input_ids]
        for index, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            q, k, v = layer.qkv(h).split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
            q = self.rope(q.view(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
            k = self.rope(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            attn = self._attention(
                q, k, v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), layout, cache, index
            )
            x = x + layer.o(attn)
            h = rms_norm(x, layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(h).split((cfg.intermediate_size, cfg.intermediate_size), dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return rms_norm(x[layout.logits_indices], self.norm, cfg.rms_norm_eps)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: BatchLayout,
        cache: CpuKVCache,
        layer: int,
    ) -> torch.Tensor:
        key_cache, value_cache = cache.keys[layer], cache.values[layer]
        key_cache.index_copy_(1, layout.slot_mapping, k.transpose(0, 1))
        value_cache.index_copy_(1, layout.slot_mapping, v.transpose(0, 1))
        # [kv_heads, B, C, head_dim] -> [B, kv_heads, C, head_dim]
        keys = key_cache[:, layout.gather_index].transpose(0, 1)
        values = value_cache[:, layout.gather_index].transpose(0, 1)
        batch = layout.num_sequences
        if layout.query_index is None:
            queries = q.unsqueeze(2)  # one query per sequence: [B, heads, 1, head_dim]
        else:
            queries = q[layout.query_index].transpose(1, 2)  # [B, heads, Q, head_dim]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=layout.attn_mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(batch * layout.max_query_len, -1)
        return out if layout.output_index is None else out[layout.output_index]
