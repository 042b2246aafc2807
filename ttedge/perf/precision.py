"""How many bytes each weight and KV-cache element of a model takes on a target: a TT precision preset
(ttnn block-float dtypes, from the model card) or one of the CPU backend's weight formats."""

from __future__ import annotations

from dataclasses import dataclass

from ttedge.model_zoo import PrecisionPreset
from ttedge.runtime.tt_host import TILE_BYTES

# A block-float element is its share of a 32 x 32 tile, shared exponents included (tt_host.TILE_BYTES).
_TT_BYTES = {dtype: tile / (32 * 32) for dtype, tile in TILE_BYTES.items()}
# CPU formats (ttedge/models/llama/linear.py): int8 is per-output-channel (one scale per row of thousands
# of weights, left out); int4 is GGUF Q4_1's layout, 16 bytes of nibbles and a bfloat16 scale and minimum
# per 32 weights.
_CPU_BYTES = {"int8": 1.0, "int4": (16 + 2 + 2) / 32}
BYTES_PER_ELEMENT = {**_TT_BYTES, **_CPU_BYTES}

# The TT port's tensors outside the presets (ttedge/models/llama/tt/weights.py): the LM head in bfloat8_b
# as tt_transformers does, embeddings and norms in bfloat16.
TT_LM_HEAD_DTYPE = "bfloat8_b"
TT_EMBEDDING_DTYPE = "bfloat16"
# The CPU backend's `auto` format (linear.py: AUTO_INT4_MAX_ROWS, AUTO_HEAD_INT8_MAX_ROWS), repeated here so
# that planning does not import torch; tests/perf/test_precision.py checks that they agree.
CPU_AUTO_INT4_MAX_ROWS = 8
CPU_AUTO_HEAD_INT8_MAX_ROWS = 2
CPU_FORMATS = ("float32", "bfloat16", "int8", "int4", "auto")


@dataclass(frozen=True)
class Precision:
    """The data type of every tensor kind of a Llama model on one target."""

    name: str
    attention: str
    mlp: str
    lm_head: str
    embedding: str
    kv_cache: str
    # The residual stream and every other activation.
    activations: str = "bfloat16"
    mlp_layer_overrides: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        for dtype in (
            self.attention,
            self.mlp,
            self.lm_head,
            self.embedding,
            self.kv_cache,
            self.activations,
        ):
            if dtype not in BYTES_PER_ELEMENT:
                raise ValueError(f"precision {self.name!r}: unknown data type {dtype!r}")

    def mlp_dtype(self, layer: int) -> str:
        return dict(self.mlp_layer_overrides).get(layer, self.mlp)

    @classmethod
    def from_preset(cls, preset: PrecisionPreset) -> Precision:
        return cls(
            name=preset.name,
            attention=preset.attention_weights,
            mlp=preset.mlp_weights,
            lm_head=TT_LM_HEAD_DTYPE,
            embedding=TT_EMBEDDING_DTYPE,
            kv_cache=preset.kv_cache,
            mlp_layer_overrides=preset.mlp_layer_overrides,
        )


def cpu_precision(weight_format: str, rows: int) -> Precision:
    """The CPU backend's ``weight_format`` as it runs a step of ``rows`` token rows: int4's LM head is int8;
    ``auto`` holds int4 and bfloat16 copies and reads the int4 ones up to 8 rows, its LM head int8 up to 2.
    Float32 models keep a float32 KV cache, the others bfloat16."""
    if weight_format not in CPU_FORMATS:
        raise ValueError(f"unknown CPU weight format {weight_format!r} (have: {', '.join(CPU_FORMATS)})")
    if rows < 1:
        raise ValueError(f"a step has at least one row, got {rows}")
    body = head = weight_format
    if weight_format == "int4":
        head = "int8"  # the LM head stays at 8 bits under int4, as GGUF keeps it (linear.build_lm_head)
    if weight_format == "auto":
        body = "int4" if rows <= CPU_AUTO_INT4_MAX_ROWS else "bfloat16"
        head = "int8" if rows <= CPU_AUTO_HEAD_INT8_MAX_ROWS else "bfloat16"
    activations = "float32" if weight_format == "float32" else "bfloat16"
    return Precision(
        name=weight_format,
        attention=body,
        mlp=body,
        lm_head=head,
        embedding=activations,
        kv_cache=activations,
        activations=activations,
    )
