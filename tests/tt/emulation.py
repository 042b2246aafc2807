"""A torch emulation of the TT-NN port's op sequence: numerics without a card.

What is real, and what is modelled:

- **Real**: the weights. They are the port's own host preparation (``weights.convert_model``: transposes,
  fused QKV, the Q/K row permutation, tile padding) converted by ttnn's own host conversion, and read back
  with ``ttnn.to_torch``: exactly the bfloat16 / bfloat8_b / bfloat4_b values the port puts in DRAM.
  The rotary tables and transformation matrix are the port's (``rope.py``), in bfloat16 as it sends them.
- **Real**: the KV cache rounding. K and V are rounded to the cache dtype by a ttnn host round trip in the
  cache's tile layout (one token per tile row, so the 16-value shared exponents group as on the device).
  That the device's packer rounds like the host conversion is assumed.
- **Modelled**, op by op in the port's order (``attention.py``, ``mlp.py``, ``decoder.py``, ``model.py``):
  every op's output is rounded to bfloat16 (the dtype ttnn ops return here); products and sums inside an op
  are float32 unless ``lofi`` is set. The math of each kernel is the library's definition (rms_norm,
  ``x * cos + (x @ T) * sin``, softmax attention with the float32 scale, SiLU fused on the gate), not its
  implementation: approximations inside kernels (``math_approx_mode``, exp/recip tables) are not modelled.
- ``lofi``: the port passes no ``compute_kernel_config``, so its linears run at ttnn 0.81.1's default,
  ``init_device_compute_kernel_config(math_fidelity=LoFi, fp32_dest_acc_en=False)``. This option models it
  approximately: operands truncated as tt-llk's fidelity golden does for LoFi (the weight, unpacked to
  srcA, keeps 4 explicit mantissa bits; the activation, srcB, keeps 6) and the K dimension summed tile by
  tile (32 at a time) into a bfloat16 accumulator. Operand placement and the accumulator's rounding are
  assumptions, not measurements.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import ttnn

from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.sharding import TensorParallelPlan
from ttedge.models.llama.tt.model_config import TILE
from ttedge.models.llama.tt.rope_tables import interleaved_cos_sin, transformation_matrix
from ttedge.models.llama.tt.weights import HostLayer, HostOuter, ModelTensors, Shards


def bf16(x: torch.Tensor) -> torch.Tensor:
    """A tensor as ttnn holds it in bfloat16 (kept here as float32 values)."""
    return x.to(torch.bfloat16).float()


def ttnn_rounded(x: torch.Tensor, dtype: ttnn.DataType) -> torch.Tensor:
    """``x`` as ttnn stores it at ``dtype`` in tile layout (its last two dimensions tiled), through ttnn's
    host conversion and back."""
    return ttnn.to_torch(ttnn.from_torch(x.float(), dtype=dtype, layout=ttnn.TILE_LAYOUT)).float()


def _truncate_mantissa(x: torch.Tensor, explicit_bits: int) -> torch.Tensor:
    """``x`` with its float32 mantissa cut to ``explicit_bits`` (toward zero), as the FPU reads a source
    register at reduced fidelity."""
    mask = np.uint32((0xFFFFFFFF << (23 - explicit_bits)) & 0xFFFFFFFF)
    bits = x.contiguous().view(torch.int32) & torch.tensor(mask.view(np.int32))
    return bits.view(torch.float32)


@dataclass(frozen=True)
class PortWeights:
    """The port's weights as values: per layer the ``HostLayer`` fields (norms flat), then the rest."""

    layers: list[dict[str, torch.Tensor]]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def converted(cls, tensors: ModelTensors, chip: int = 0) -> PortWeights:
        """What the port puts in DRAM (of ``chip`` on a mesh): ttnn's converted host tensors, read back."""
        return cls(
            layers=[
                {name: _flat_norms(name, _values(t, chip)) for name, t in vars(layer).items()}
                for layer in tensors.layers
            ],
            embed=_values(tensors.embed, chip),
            norm=_values(tensors.norm, chip).reshape(-1),
            lm_head=_values(tensors.lm_head, chip),
        )

    @classmethod
    def prepared(cls, layers: list[HostLayer], outer: HostOuter) -> PortWeights:
        """The host preparation alone, in float32 (no conversion)."""
        return cls(
            layers=[
                {name: _flat_norms(name, torch.from_numpy(a)) for name, a in vars(layer).items()}
                for layer in layers
            ],
            embed=torch.from_numpy(outer.embed),
            norm=torch.from_numpy(outer.norm).reshape(-1),
            lm_head=torch.from_numpy(outer.lm_head),
        )

    @classmethod
    def prepared_slices(cls, layers: list[Shards], outer: Shards, chip: int) -> PortWeights:
        """``chip``'s slices of the host preparation (``weights.shard_layer``, ``shard_outer``), float32."""

        def of_chip(shards: Shards) -> dict[str, np.ndarray]:
            return {name: arrays[chip if len(arrays) > 1 else 0] for name, arrays in shards.items()}

        return cls.prepared([HostLayer(**of_chip(layer)) for layer in layers], HostOuter(**of_chip(outer)))


def _flat_norms(name: str, t: torch.Tensor) -> torch.Tensor:
    # Norm weights are stored as rows one tile wide (``ttnn.rms_norm``'s layout).
    return t.reshape(-1) if name.endswith("norm") else t


def _values(tensor: ttnn.Tensor, chip: int) -> torch.Tensor:
    """A converted host tensor ``[1, 1, rows, cols]`` (``chip``'s slice of a split one) as float32
    ``[rows, cols]``."""
    slices = ttnn.get_device_tensors(tensor)
    one = slices[chip] if len(slices) > 1 else tensor
    return ttnn.to_torch(one).float().reshape(one.shape[-2], one.shape[-1])


class PortEmulation:
    """The port's forward over one user's tokens at positions ``0 .. n-1`` (prefill and decode compute the
    same per-token math: each token attends to the cache's rounded K/V of itself and every earlier token).

    ``exact`` drops every rounding (activations stay float32, the cache keeps K/V as they are): the op
    sequence alone, which must then compute the reference's function.
    """

    def __init__(
        self,
        config: ModelConfig,
        weights: PortWeights,
        kv_dtype: ttnn.DataType,
        inv_freq: np.ndarray,
        lofi: bool = False,
        exact: bool = False,
    ):
        self.config, self.weights, self.kv_dtype, self.inv_freq = config, weights, kv_dtype, inv_freq
        self.lofi, self.exact = lofi, exact
        self.trans_mat = torch.from_numpy(transformation_matrix())
        self.scale = float(np.float32(config.head_dim**-0.5))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """An op's output: bfloat16, as ttnn ops return it here."""
        return x if self.exact else bf16(x)

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if not self.lofi:
            return self.out(x @ w)
        a, b = _truncate_mantissa(x, 6), _truncate_mantissa(w, 4)
        # Per 32-wide K tile in float32, accumulated tile after tile in a bfloat16 destination.
        partials = torch.einsum("tkc,kcn->ktn", a.view(x.shape[0], -1, TILE), b.view(-1, TILE, w.shape[1]))
        total = torch.zeros_like(partials[0])
        for partial in partials:
            total = bf16(total + partial)  # the default fp32_dest_acc_en=False: a bfloat16 destination
        return total

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.out(F.rms_norm(x, (x.shape[-1],), weight, self.config.rms_norm_eps))

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``rotary_embedding_llama``: ``x * cos + (x @ T) * sin``, T on each 32-wide tile of the head."""
        turned = (x.reshape(*x.shape[:-1], -1, TILE) @ self.trans_mat).reshape(x.shape)
        return self.out(x * cos[:, None] + turned * sin[:, None])

    def attention(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s attention over ``x`` ``[n, hidden]``, ahead of the residual add."""
        cfg, layer = self.config, self.weights.layers[index]
        n = x.shape[0]
        qkv = self.linear(x, layer["wqkv"])
        q = qkv[:, : cfg.q_size].view(n, cfg.num_heads, cfg.head_dim)
        k = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(n, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[:, cfg.q_size + cfg.kv_size :].view(n, cfg.num_kv_heads, cfg.head_dim)
        tables = interleaved_cos_sin(self.inv_freq, np.arange(n))
        cos, sin = (self.out(torch.from_numpy(table).float()) for table in tables)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        # The cache: [kv_heads, tokens, head_dim] tiles, one token per tile row.
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        if not self.exact:
            k, v = ttnn_rounded(k, self.kv_dtype), ttnn_rounded(v, self.kv_dtype)
        group = cfg.num_heads // cfg.num_kv_heads
        scores = (q.transpose(0, 1) @ k.repeat_interleave(group, 0).transpose(1, 2)) * self.scale
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads = self.out(probs @ v.repeat_interleave(group, 0))  # [heads, n, head_dim]
        return self.linear(heads.transpose(0, 1).reshape(n, cfg.q_size), layer["wo"])

    def mlp(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.weights.layers[index]
        gated = self.out(F.silu(self.linear(x, layer["w1"])) * self.linear(x, layer["w3"]))
        return self.linear(gated, layer["w2"])

    def decoder(self, index: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.weights.layers[index]
        h = self.out(x + self.attention(index, self.rms_norm(x, layer["attn_norm"])))
        return self.out(h + self.mlp(index, self.rms_norm(h, layer["mlp_norm"])))

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the padded vocabulary."""
        return self.linear(x, self.weights.lm_head)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """float32 ``[n, vocab]``: every position's logits, as the port's prefill with ``all_rows``."""
        weights = self.weights
        x = weights.embed[torch.tensor(tokens)]
        for index in range(len(weights.layers)):
            x = self.decoder(index, x)
        return self.lm_head(self.rms_norm(x, weights.norm))[:, : self.config.vocab_size]


class ShardedPortEmulation(PortEmulation):
    """The port split over ``plan.devices`` chips (``chips``: each chip's weights, in chip order): every
    chip's attention and MLP over its own slices and heads, summed as the all-reduce does; the norms and
    residual adds on the whole residual stream, as every chip runs them; the logits concatenated."""

    def __init__(
        self,
        config: ModelConfig,
        plan: TensorParallelPlan,
        chips: list[PortWeights],
        kv_dtype: ttnn.DataType,
        inv_freq: np.ndarray,
        lofi: bool = False,
        exact: bool = False,
    ):
        super().__init__(config, chips[0], kv_dtype, inv_freq, lofi, exact)
        # What one chip computes: its own query and KV heads, through the single-chip op sequence.
        chip_config = dataclasses.replace(
            config, num_heads=plan.query_heads_per_device, num_kv_heads=plan.kv_heads_per_device
        )
        self.chips = [PortEmulation(chip_config, w, kv_dtype, inv_freq, lofi, exact) for w in chips]

    def all_reduce(self, parts: list[torch.Tensor]) -> torch.Tensor:
        total = parts[0]
        for part in parts[1:]:
            total = self.out(total + part)
        return total

    def attention(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce([chip.attention(index, x) for chip in self.chips])

    def mlp(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce([chip.mlp(index, x) for chip in self.chips])

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([chip.lm_head(x) for chip in self.chips], dim=-1)
