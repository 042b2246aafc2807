"""Host-side weight preparation: canonical numpy float32 arrays to the layouts the decode port reads.

What changes on the way from ``ttedge.checkpoint`` (``[out, in]``, Hugging Face rotate-half Q/K order):

- linears are transposed to ``[in, out]`` (ttnn.linear computes ``x @ w``);
- Q, K and V are fused into one ``[hidden, (heads + 2 * kv_heads) * head_dim]`` matrix;
- the rows of Q and K are permuted per head from rotate-half order (pairs ``(j, j + head_dim/2)``) to
  Meta's interleaved order (pairs ``(2i, 2i+1)``), because ``rotary_embedding_llama`` rotates adjacent
  pairs through its transformation matrix. This is tt_transformers' ``reverse_permute`` in
  ``load_checkpoints.py``; q . k is unchanged when both are permuted alike, so attention is too (proved
  on the host by ``tests/tt/test_port_weights.py``);
- the MLP width and the vocabulary are zero-padded to whole tiles: a zero gate/up column gives
  silu(0) * 0 = 0 through a zero down row, and padded logits are cut off by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ConfigError, ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.model_config import TILE, WEIGHTS_MEMORY


def hf_to_meta_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K weight ``[num_heads * head_dim, in]`` from rotate-half to interleaved
    pairs: Meta row ``2i + half`` of a head is Hugging Face row ``half * head_dim / 2 + i``."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def pad_to_tile(n: int) -> int:
    return -(-n // TILE) * TILE


def _pad(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.pad(w, ((0, rows - w.shape[0]), (0, cols - w.shape[1])))


@dataclass(frozen=True)
class WeightDtypes:
    """ttnn data types of one layer's weights and KV cache, from a model card's precision preset.

    The down projection (w2) never goes below bfloat8_b: tt_transformers' performance mode keeps w2 at
    bfloat8_b while w1/w3 drop to bfloat4_b, because w2's error lands directly on the residual stream.
    """

    attention: ttnn.DataType
    w1_w3: ttnn.DataType
    w2: ttnn.DataType
    kv_cache: ttnn.DataType

    @classmethod
    def from_preset(cls, preset: PrecisionPreset, layer: int) -> WeightDtypes:
        mlp = dict(preset.mlp_layer_overrides).get(layer, preset.mlp_weights)
        return cls(
            attention=getattr(ttnn, preset.attention_weights),
            w1_w3=getattr(ttnn, mlp),
            w2=ttnn.bfloat8_b if mlp == "bfloat4_b" else getattr(ttnn, mlp),
            kv_cache=getattr(ttnn, preset.kv_cache),
        )


# The LM head and embeddings are not in the presets: bfloat8_b for the head as tt_transformers does, and
# bfloat16 row-major embeddings (ttnn.embedding gathers rows, which block-float tiles cannot give).
LM_HEAD_DTYPE = ttnn.bfloat8_b


@dataclass(frozen=True)
class HostLayer:
    """One decoder layer's weights, prepared on the host (float32, padded, ``[in, out]``)."""

    attn_norm: np.ndarray  # [hidden // TILE, TILE]
    wqkv: np.ndarray  # [hidden, q_size + 2 * kv_size], Q and K rows in Meta order
    wo: np.ndarray  # [q_size, hidden]
    mlp_norm: np.ndarray
    w1: np.ndarray  # gate, [hidden, padded intermediate]
    w3: np.ndarray  # up
    w2: np.ndarray  # down, [padded intermediate, hidden]


@dataclass(frozen=True)
class HostModel:
    layers: list[HostLayer]
    embed: np.ndarray  # [vocab, hidden]
    norm: np.ndarray  # [hidden // TILE, TILE]
    lm_head: np.ndarray  # [hidden, padded vocab]


def _norm_rows(w: np.ndarray) -> np.ndarray:
    # ttnn.rms_norm reads its weight as rows one tile wide (tt_transformers' RMSNorm does the same).
    return w.reshape(-1, TILE)


def check_config(config: ModelConfig) -> None:
    """Refuse shapes the kernels cannot tile, before any weight is touched (a ``ConfigError``: the CLI
    reports it as one line)."""
    if config.hidden_size % TILE or config.head_dim % TILE:
        raise ConfigError(
            config.name,
            f"hidden size {config.hidden_size} and head dim {config.head_dim} must be multiples of {TILE} "
            "for the TT port",
        )
    if config.num_heads % config.num_kv_heads:
        raise ConfigError(config.name, f"{config.num_heads} heads do not group over {config.num_kv_heads}")


def prepare_layer(config: ModelConfig, tensors: Mapping[str, np.ndarray], index: int) -> HostLayer:
    p = f"layers.{index}."
    ffn = pad_to_tile(config.intermediate_size)
    q = hf_to_meta_rows(tensors[p + "attn.q.weight"], config.num_heads)
    k = hf_to_meta_rows(tensors[p + "attn.k.weight"], config.num_kv_heads)
    v = tensors[p + "attn.v.weight"]
    hidden = config.hidden_size
    return HostLayer(
        attn_norm=_norm_rows(tensors[p + "attn_norm.weight"]),
        wqkv=np.concatenate([q, k, v], axis=0).T,
        wo=tensors[p + "attn.o.weight"].T,
        mlp_norm=_norm_rows(tensors[p + "mlp_norm.weight"]),
        w1=_pad(tensors[p + "mlp.gate.weight"].T, hidden, ffn),
        w3=_pad(tensors[p + "mlp.up.weight"].T, hidden, ffn),
        w2=_pad(tensors[p + "mlp.down.weight"].T, ffn, hidden),
    )


def prepare_model(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> HostModel:
    """All weights of ``config`` from canonical float32 arrays (``ttedge.checkpoint.base`` names)."""
    check_config(config)
    head = tensors["embed.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return HostModel(
        layers=[prepare_layer(config, tensors, i) for i in range(config.num_layers)],
        embed=tensors["embed.weight"],
        norm=_norm_rows(tensors["norm.weight"]),
        lm_head=_pad(head.T, config.hidden_size, pad_to_tile(config.vocab_size)),
    )


def host_tensor(
    array: np.ndarray, dtype: ttnn.DataType, layout: ttnn.Layout = ttnn.TILE_LAYOUT
) -> ttnn.Tensor:
    """A host ttnn tensor of ``array``'s shape, converted (and block-float rounded) by ttnn.

    Built from numpy, not torch: ``.venv-tt`` has no torch (docs/tt-validation.md). Block-float
    conversion needs ``TT_METAL_MOCK_CLUSTER_DESC_PATH`` (or a card) even on the host.
    """
    host_dtype = np.int32 if dtype == ttnn.int32 else np.uint32 if dtype == ttnn.uint32 else np.float32
    return ttnn.Tensor(tensor=np.ascontiguousarray(array, dtype=host_dtype), data_type=dtype, layout=layout)


def device_weight(
    mesh: ttnn.MeshDevice,
    array: np.ndarray,
    dtype: ttnn.DataType,
    layout: ttnn.Layout = ttnn.TILE_LAYOUT,
    memory_config: ttnn.MemoryConfig = WEIGHTS_MEMORY,
) -> ttnn.Tensor:
    """A weight on the device; 2-D matrices become ``[1, 1, rows, cols]`` as the ttnn ops expect."""
    # Host first, then `to`: the numpy constructor refuses sharded memory configs (docs/tt-validation.md).
    four_d = array[None, None] if array.ndim == 2 else array
    return host_tensor(four_d, dtype, layout).to(mesh, memory_config)


def norm_weight(mesh: ttnn.MeshDevice, rows: np.ndarray) -> ttnn.Tensor:
    return device_weight(mesh, rows, ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)
