"""What every checkpoint reader hands to the rest of ttedge.

Readers translate their format's tensor names into one canonical naming (below), in PyTorch
``nn.Linear`` layout (``[out_features, in_features]``) and with Q/K rows in the Hugging Face
"rotate-half" order, so that model code never knows which format the weights came from.

Canonical names (``{i}`` is the layer index):

    embed.weight                 [vocab, hidden]
    layers.{i}.attn_norm.weight  [hidden]
    layers.{i}.attn.q.weight     [heads * head_dim, hidden]
    layers.{i}.attn.k.weight     [kv_heads * head_dim, hidden]
    layers.{i}.attn.v.weight     [kv_heads * head_dim, hidden]
    layers.{i}.attn.o.weight     [hidden, heads * head_dim]
    layers.{i}.mlp_norm.weight   [hidden]
    layers.{i}.mlp.gate.weight   [intermediate, hidden]
    layers.{i}.mlp.up.weight     [intermediate, hidden]
    layers.{i}.mlp.down.weight   [hidden, intermediate]
    norm.weight                  [hidden]
    lm_head.weight               [vocab, hidden]   (absent when the embeddings are tied)
    rope.freq_factors            [head_dim / 2]    (optional: per-frequency divisors, GGUF llama3 scaling)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ttedge.config import ModelConfig


class CheckpointError(Exception):
    """A checkpoint that cannot be read; always names the file and, where one is at fault, the tensor."""

    def __init__(self, file: str | Path, message: str, tensor: str | None = None):
        where = f"{file}" if tensor is None else f"{file} [tensor {tensor}]"
        super().__init__(f"{where}: {message}")
        self.file = str(file)
        self.tensor = tensor


@dataclass(frozen=True)
class QuantizedBlocks:
    """Raw GGUF block data of one 2-D tensor, rows already in canonical order.

    ``data`` is ``uint8[rows, bytes_per_row]``; ``qtype`` is the GGML type name (``"Q4_1"``, ...).
    Kept so that CPU kernels with the same block structure can repack without re-rounding.
    """

    qtype: str
    data: np.ndarray
    shape: tuple[int, int]


@dataclass
class TensorSource:
    """One tensor of a checkpoint, read lazily.

    ``load()`` returns the tensor dequantised to ``float32`` (or in its stored float dtype
    when ``keep_dtype`` is set), in canonical layout. ``stored_dtype`` names what the file holds
    (``"F32"``, ``"BF16"``, ``"Q4_1"``, ...).
    """

    name: str
    shape: tuple[int, ...]
    stored_dtype: str
    file: str
    _loader: Callable[[], torch.Tensor] = field(repr=False)
    # May itself answer None: a view whose slice cuts through the blocks has none (runtime/shard_checkpoint).
    _blocks: Callable[[], QuantizedBlocks | None] | None = field(default=None, repr=False)

    def load(self) -> torch.Tensor:
        return self._loader()

    def quantized_blocks(self) -> QuantizedBlocks | None:
        """The raw block data when the file stores a GGML block-quantised type, else ``None``."""
        return None if self._blocks is None else self._blocks()


@dataclass
class Checkpoint:
    path: Path
    format: str  # "safetensors" | "gguf"
    config: ModelConfig
    tensors: dict[str, TensorSource]
    # Where the tokenizer lives: a tokenizer.json directory for HF, the GGUF file itself for GGUF.
    tokenizer_path: Path
    # Raw GGUF metadata or HF tokenizer_config.json contents, for the tokenizer and chat template.
    metadata: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TensorSource:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(self.path, "required tensor is missing", tensor=name) from None

    def load(self, name: str) -> torch.Tensor:
        return self[name].load()

    def layers_only(self, indices: Sequence[int]) -> Checkpoint:
        """A view of the global tensors and of the layers ``indices``, renumbered 0, 1, ... in that order: a
        model built from it reads nothing else (a self-draft of a model that runs elsewhere)."""
        position = {index: new for new, index in enumerate(indices)}
        kept = {}
        for name, source in self.tensors.items():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                if int(index) in position:
                    kept[f"layers.{position[int(index)]}.{rest}"] = source
            else:
                kept[name] = source
        config = dataclasses.replace(self.config, num_layers=len(indices))
        return dataclasses.replace(self, config=config, tensors=kept)


def canonical_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The canonical name and shape of every tensor a checkpoint of ``config`` must hold.

    ``lm_head.weight`` is listed only for untied configs; optional tensors are in ``optional_shapes``.
    """
    h, q, kv, ff = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        shapes[p + "attn.q.weight"] = (q, h)
        shapes[p + "attn.k.weight"] = (kv, h)
        shapes[p + "attn.v.weight"] = (kv, h)
        shapes[p + "attn.o.weight"] = (h, q)
        shapes[p + "mlp_norm.weight"] = (h,)
        shapes[p + "mlp.gate.weight"] = (ff, h)
        shapes[p + "mlp.up.weight"] = (ff, h)
        shapes[p + "mlp.down.weight"] = (h, ff)
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def optional_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensors a checkpoint may hold, with their shapes."""
    return {"rope.freq_factors": (config.head_dim // 2,)}


class TensorNaming:
    """Maps a format's tensor names to canonical ones and back.

    ``layer_prefix`` is the format's per-layer prefix with ``{i}`` for the layer index; the two
    tables map the format's names (per layer without the prefix, and global) to canonical ones.
    """

    def __init__(self, layer_prefix: str, layer_names: dict[str, str], global_names: dict[str, str]):
        self._layer_prefix = layer_prefix
        self._layer = layer_names
        self._global = global_names
        self._layer_back = {canonical: stored for stored, canonical in layer_names.items()}
        self._global_back = {canonical: stored for stored, canonical in global_names.items()}
        self._layer_re = re.compile(re.escape(layer_prefix).replace(r"\{i\}", r"(\d+)") + r"(.+)")

    def canonical(self, stored: str) -> str | None:
        """The canonical name of a stored tensor name, or ``None`` if it has none."""
        if stored in self._global:
            return self._global[stored]
        match = self._layer_re.fullmatch(stored)
        if match and match.group(2) in self._layer:
            return f"layers.{match.group(1)}.{self._layer[match.group(2)]}"
        return None

    def stored(self, canonical: str) -> str:
        """The format's name of a canonical tensor name."""
        if canonical.startswith("layers."):
            _, index, rest = canonical.split(".", 2)
            return self._layer_prefix.format(i=index) + self._layer_back[rest]
        return self._global_back[canonical]
