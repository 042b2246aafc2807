"""Host-side weight preparation and conversion: canonical numpy float32 arrays to the layouts the port
reads, then to ttnn host tensors in their device formats (through the on-disk cache, ``weight_cache.py``).

What changes on the way from ``ttedge.checkpoint`` (``[out, in]``, Hugging Face rotate-half Q/K order):

- linears are transposed to ``[in, out]`` (ttnn.linear computes ``x @ w``);
- Q, K and V are fused into one ``[hidden, (heads + 2 * kv_heads) * head_dim]`` matrix;
- the rows of Q and K are permuted per head from rotate-half order (pairs ``(j, j + head_dim/2)``) to
  Meta's interleaved order (pairs ``(2i, 2i+1)``), because ``rotary_embedding_llama`` rotates adjacent
  pairs through its transformation matrix. This is tt_transformers' ``reverse_permute`` in
  ``load_checkpoints.py``; q . k is unchanged when both are permuted alike, so attention is too (proved
  on the host by ``tests/tt/test_port_weights.py``);
- the MLP width and the vocabulary are zero-padded to whole tiles (on a mesh of N chips, to N equal runs
  of whole tiles): a zero gate/up column gives silu(0) * 0 = 0 through a zero down row, and padded logits
  are cut off by the caller.

On a mesh the prepared arrays are then split into per-chip slices (``shard_layer``, ``shard_outer``) as
``ethernet_mesh.sharding`` plans them; ``tensor_parallel.py`` says how the chips put the results together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ConfigError, ModelConfig
from ttedge.ethernet_mesh.sharding import TensorParallelPlan, plan_tensor_parallel
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.model_config import TILE
from ttedge.models.llama.tt.rope_tables import hf_to_meta_rows
from ttedge.models.llama.tt.weight_cache import WeightCache


def pad_to_tile(n: int, devices: int = 1) -> int:
    """``n`` rounded up to ``devices`` equal runs of whole tiles (one run on a single chip)."""
    step = TILE * devices
    return -(-n // step) * step


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
class HostOuter:
    """The weights outside the decoder layers, prepared on the host."""

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


def prepare_layer(
    config: ModelConfig, tensors: Mapping[str, np.ndarray], index: int, devices: int = 1
) -> HostLayer:
    """Layer ``index`` whole, its MLP width padded to split evenly over ``devices`` chips."""
    p = f"layers.{index}."
    ffn = pad_to_tile(config.intermediate_size, devices)
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


def prepare_outer(config: ModelConfig, tensors: Mapping[str, np.ndarray], devices: int = 1) -> HostOuter:
    """The weights outside the layers, the vocabulary padded to split evenly over ``devices`` chips."""
    embed = tensors["embed.weight"]  # read once: a lazy mapping loads it per access
    head = embed if config.tie_word_embeddings else tensors["lm_head.weight"]
    return HostOuter(
        embed=embed,
        norm=_norm_rows(tensors["norm.weight"]),
        lm_head=_pad(head.T, config.hidden_size, pad_to_tile(config.vocab_size, devices)),
    )


# Per field, its arrays in chip order: one array for a field every chip holds whole (and on one chip).
Shards = dict[str, list[np.ndarray]]


def _columns(w: np.ndarray, devices: int) -> list[np.ndarray]:
    return np.split(w, devices, axis=1)


def _rows(w: np.ndarray, devices: int) -> list[np.ndarray]:
    return np.split(w, devices, axis=0)


def _qkv_columns(config: ModelConfig, wqkv: np.ndarray, plan: TensorParallelPlan) -> list[np.ndarray]:
    """Each chip's fused QKV columns: its query heads, then the KV heads they attend with (a KV head
    repeated on every chip whose query heads share it when there are fewer KV heads than chips)."""
    split = np.split(wqkv, [config.q_size, config.q_size + config.kv_size], axis=1)
    shards = []
    for device in range(plan.devices):
        columns = []
        for weight, name in zip(split, ("q", "k", "v"), strict=True):
            part = plan.weight(name).slice_of(device)
            assert part is not None  # Q, K and V are split, never replicated
            # The plan's output rows are this layout's columns.
            columns.append(weight[:, part.rows[0] : part.rows[1]])
        shards.append(np.concatenate(columns, axis=1))
    return shards


def shard_layer(config: ModelConfig, layer: HostLayer, plan: TensorParallelPlan) -> Shards:
    """``layer`` (prepared for ``plan.devices`` chips) split as ``plan`` says: QKV, w1 and w3 over their
    output columns, WO and w2 over their input rows, the norms whole."""
    devices = plan.devices
    return {
        "attn_norm": [layer.attn_norm],
        "wqkv": _qkv_columns(config, layer.wqkv, plan),
        "wo": _rows(layer.wo, devices),
        "mlp_norm": [layer.mlp_norm],
        "w1": _columns(layer.w1, devices),
        "w3": _columns(layer.w3, devices),
        "w2": _rows(layer.w2, devices),
    }


def shard_outer(outer: HostOuter, plan: TensorParallelPlan) -> Shards:
    """The embedding and final norm whole on every chip, the LM head split over the vocabulary."""
    return {
        "embed": [outer.embed],
        "norm": [outer.norm],
        "lm_head": _columns(outer.lm_head, plan.devices),
    }


def host_tensor(
    array: np.ndarray, dtype: ttnn.DataType, layout: ttnn.Layout = ttnn.TILE_LAYOUT
) -> ttnn.Tensor:
    """A host ttnn tensor of ``array``'s shape, converted (and block-float rounded) by ttnn.

    Built from numpy, not torch: ``.venv-tt`` has no torch (docs/tt-validation.md). Block-float
    conversion needs ``TT_METAL_MOCK_CLUSTER_DESC_PATH`` (or a card) even on the host.
    """
    host_dtype = np.int32 if dtype == ttnn.int32 else np.uint32 if dtype == ttnn.uint32 else np.float32
    return ttnn.Tensor(tensor=np.ascontiguousarray(array, dtype=host_dtype), data_type=dtype, layout=layout)


def device_tensor(
    mesh: ttnn.MeshDevice, array: np.ndarray, dtype: ttnn.DataType, memory_config: ttnn.MemoryConfig
) -> ttnn.Tensor:
    """``array`` in tile layout on the device."""
    # Host first, then `to`: the numpy constructor refuses sharded memory configs (docs/tt-validation.md).
    return host_tensor(array, dtype).to(mesh, memory_config)


# A tensor's ttnn data type and layout on the device.
TensorFormat = tuple[ttnn.DataType, ttnn.Layout]
# Norm weights and embeddings stay bfloat16 row-major (see LM_HEAD_DTYPE).
ROW_MAJOR_BFLOAT16: TensorFormat = (ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)


def layer_formats(dtypes: WeightDtypes) -> dict[str, TensorFormat]:
    """The format of each ``HostLayer`` field on the device."""
    tile = ttnn.TILE_LAYOUT
    return {
        "attn_norm": ROW_MAJOR_BFLOAT16,
        "wqkv": (dtypes.attention, tile),
        "wo": (dtypes.attention, tile),
        "mlp_norm": ROW_MAJOR_BFLOAT16,
        "w1": (dtypes.w1_w3, tile),
        "w3": (dtypes.w1_w3, tile),
        "w2": (dtypes.w2, tile),
    }


OUTER_FORMATS: dict[str, TensorFormat] = {
    "embed": ROW_MAJOR_BFLOAT16,
    "norm": ROW_MAJOR_BFLOAT16,
    "lm_head": (LM_HEAD_DTYPE, ttnn.TILE_LAYOUT),
}


@dataclass(frozen=True)
class LayerTensors:
    """One decoder layer's weights as ttnn host tensors ``[1, 1, rows, cols]`` in their device formats
    (``HostLayer``'s fields, converted and block-float rounded); the modules move them to the device."""

    attn_norm: ttnn.Tensor
    wqkv: ttnn.Tensor
    wo: ttnn.Tensor
    mlp_norm: ttnn.Tensor
    w1: ttnn.Tensor
    w3: ttnn.Tensor
    w2: ttnn.Tensor


@dataclass(frozen=True)
class ModelTensors:
    layers: list[LayerTensors]
    embed: ttnn.Tensor
    norm: ttnn.Tensor
    lm_head: ttnn.Tensor


# The fields ``shard_layer`` and ``shard_outer`` give every chip whole; the others, one slice per chip.
REPLICATED_FIELDS = frozenset({"attn_norm", "mlp_norm", "embed", "norm"})


def _cache_names(name: str, devices: int) -> list[str]:
    """The cache entries of one field: the field's own name when one tensor serves every chip (as on a
    single chip), else one entry per chip, ``<name>.device<d>``. The cache directory is per mesh shape."""
    if devices == 1 or name in REPLICATED_FIELDS:
        return [name]
    return [f"{name}.device{device}" for device in range(devices)]


def _mesh_tensor(tensors: list[ttnn.Tensor], devices: int) -> ttnn.Tensor:
    """One host tensor every chip receives whole, or the per-chip slices as one host tensor over the 1xN
    mesh, which ``Tensor.to(mesh)`` places slice ``d`` on chip ``d``."""
    if len(tensors) == 1:
        return tensors[0]
    return ttnn.from_host_shards(tensors, ttnn.MeshShape(1, devices))


def _convert(
    formats: Mapping[str, TensorFormat],
    prepare: Callable[[], Shards],
    cache: WeightCache | None,
    prefix: str,
    devices: int,
) -> dict[str, ttnn.Tensor]:
    """The named tensors in ``formats``: from the cache where it holds every slice of them, else converted
    from ``prepare()``'s arrays and stored slice by slice. ``prepare`` runs only on a miss, so a cached model
    never reads its checkpoint."""
    found: dict[str, list[ttnn.Tensor]] = {}
    if cache is not None:
        for name, (dtype, layout) in formats.items():
            slices = [cache.load(prefix + entry, dtype, layout) for entry in _cache_names(name, devices)]
            if all(tensor is not None for tensor in slices):
                found[name] = [tensor for tensor in slices if tensor is not None]
    if len(found) < len(formats):
        prepared = prepare()
        for name, (dtype, layout) in formats.items():
            if name not in found:
                entries = _cache_names(name, devices)
                arrays = prepared[name]
                assert len(arrays) == len(entries), f"{name}: {len(arrays)} slices for {len(entries)} entries"
                found[name] = [host_tensor(array[None, None], dtype, layout) for array in arrays]
                if cache is not None:
                    for entry, tensor in zip(entries, found[name], strict=True):
                        cache.store(prefix + entry, tensor)
    return {name: _mesh_tensor(slices, devices) for name, slices in found.items()}


def convert_layer(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    dtypes: WeightDtypes,
    index: int,
    cache: WeightCache | None = None,
    plan: TensorParallelPlan | None = None,
) -> LayerTensors:
    """Layer ``index``'s weights prepared, split as ``plan`` says (default: one chip) and converted to
    ``dtypes``, through ``cache`` when given."""
    plan = plan or plan_tensor_parallel(config, 1)

    def prepare() -> Shards:
        return shard_layer(config, prepare_layer(config, tensors, index, plan.devices), plan)

    return LayerTensors(**_convert(layer_formats(dtypes), prepare, cache, f"layers.{index}.", plan.devices))


def convert_model(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    preset: PrecisionPreset,
    cache: WeightCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    devices: int = 1,
) -> ModelTensors:
    """Every weight of ``config`` prepared and converted to its device format under ``preset``, through
    ``cache`` when given, split over a 1x``devices`` mesh as ``ethernet_mesh.sharding`` plans it (a
    ``ShardingError`` before any weight is read when a split does not divide). ``tensors`` holds canonical
    float32 arrays (``ttedge.checkpoint.base`` names) and is read only for what the cache lacks;
    ``progress(done, total)`` is called after each layer and after the embedding, norm and head."""
    check_config(config)
    plan = plan_tensor_parallel(config, devices)
    total = config.num_layers + 1
    layers = []
    for index in range(config.num_layers):
        dtypes = WeightDtypes.from_preset(preset, index)
        layers.append(convert_layer(config, tensors, dtypes, index, cache, plan))
        if progress is not None:
            progress(index + 1, total)

    def prepare_outer_shards() -> Shards:
        return shard_outer(prepare_outer(config, tensors, devices), plan)

    outer = _convert(OUTER_FORMATS, prepare_outer_shards, cache, "", devices)
    if progress is not None:
        progress(total, total)
    return ModelTensors(layers=layers, **outer)
