"""GGUF files (llama.cpp), llama architecture, dequantised with ``gguf.quants``.

``gguf.GGUFReader`` memory-maps the file; opening parses the header and checks every tensor's
name, type and shape, and ``TensorSource.load()`` reads one tensor. ``Checkpoint.metadata`` holds
every key/value pair of the file under its GGUF key (``general.*``, ``llama.*``, ``tokenizer.ggml.*``,
``tokenizer.chat_template``, ...), decoded to ``str``/``int``/``float``/``bool`` or lists of them.

llama.cpp's converter reorders the rows of Q and K so that its rope rotates interleaved pairs;
this reader restores the Hugging Face "rotate-half" row order (in ``load()`` and in
``quantized_blocks()`` alike), as the canonical layout requires.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.gguf_reader import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from ttedge.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    QuantizedBlocks,
    TensorNaming,
    TensorSource,
    canonical_shapes,
    optional_shapes,
)
from ttedge.config import ConfigError, ModelConfig

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_BLOCK_TYPES = (
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q6_K,
)
SUPPORTED_TYPES = tuple(t.name for t in (*_FLOAT_TYPES, *_BLOCK_TYPES))

_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q.weight",
    "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope.freq_factors",
}
_NAMING = TensorNaming("blk.{i}.", _LAYER_NAMES, _GLOBAL_NAMES)
# End-of-generation tokens besides eos (llama.cpp stops on all of them), e.g. Llama 3's <|eot_id|>.
_EXTRA_EOG_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def canonical_name(gguf_name: str) -> str | None:
    """The canonical name of a llama GGUF tensor name, or ``None`` if it has none."""
    return _NAMING.canonical(gguf_name)


def gguf_name(canonical: str) -> str:
    """The llama GGUF name of a canonical tensor name."""
    return _NAMING.stored(canonical)


def open_gguf_checkpoint(file: Path, *, keep_dtype: bool = False) -> Checkpoint:
    """Open a llama GGUF file; every tensor's presence, type and shape is checked here."""
    reader = _open_reader(file)
    metadata = _decode_metadata(reader, file)
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(file, f"unsupported architecture {arch!r}; ttedge reads llama GGUF files")
    try:
        config = ModelConfig.from_gguf(metadata, source=str(file))
    except ConfigError as err:
        raise CheckpointError(file, str(err).removeprefix(f"{err.source}: ")) from None
    stored_names = {t.name for t in reader.tensors}
    # GGUF marks tied embeddings only by leaving out the output layer.
    config = dataclasses.replace(
        config,
        tie_word_embeddings="output.weight" not in stored_names,
        eos_token_ids=_end_of_generation_ids(config, metadata, file),
    )

    expected = canonical_shapes(config) | optional_shapes(config)
    row_orders = {
        "attn.q.weight": _rope_row_order(config.q_size, config.num_heads),
        "attn.k.weight": _rope_row_order(config.kv_size, config.num_kv_heads),
    }
    stamp = _stamp(file)
    tensors: dict[str, TensorSource] = {}
    for tensor in reader.tensors:
        name = canonical_name(tensor.name)
        if name is None or name not in expected:
            raise CheckpointError(
                file,
                f"unexpected tensor: not part of a {config.num_layers}-layer llama checkpoint",
                tensor=tensor.name,
            )
        qtype = tensor.tensor_type
        if qtype not in _FLOAT_TYPES and qtype not in _BLOCK_TYPES:
            raise CheckpointError(
                file,
                f"unsupported tensor type {qtype.name} (supported: {', '.join(SUPPORTED_TYPES)})",
                tensor=tensor.name,
            )
        # GGUF lists dimensions innermost first (ne0 = columns).
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[name]:
            raise CheckpointError(
                file,
                f"shape {list(shape)} contradicts the metadata, which implies {list(expected[name])}",
                tensor=tensor.name,
            )
        order = row_orders.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        tensors[name] = TensorSource(
            name=name,
            shape=shape,
            stored_dtype=qtype.name,
            file=str(file),
            _loader=_loader(tensor, file, stamp, shape, order, keep_dtype),
            _blocks=_block_reader(tensor, file, stamp, shape, order) if qtype in _BLOCK_TYPES else None,
        )
    for name in canonical_shapes(config):
        if name not in tensors:
            raise CheckpointError(file, "required tensor is missing", tensor=gguf_name(name))
    return Checkpoint(
        path=file,
        format="gguf",
        config=config,
        tensors=tensors,
        tokenizer_path=file,
        metadata=metadata,
    )


def _open_reader(file: Path) -> GGUFReader:
    try:
        with open(file, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise CheckpointError(file, f"cannot read: {err}") from None
    if magic != b"GGUF":
        raise CheckpointError(file, f"not a GGUF file: bad magic {magic!r} (expected b'GGUF')")
    try:
        reader = GGUFReader(file)
    # GGUFReader walks the header with raw numpy views and reports damage as whatever numpy,
    # the enum constructors or its own checks raise (ValueError, KeyError, IndexError, ...).
    except Exception as err:
        raise CheckpointError(
            file, f"truncated or corrupted GGUF file ({type(err).__name__}: {err})"
        ) from None
    if reader.byte_order != "I":
        raise CheckpointError(file, "GGUF file of the opposite byte order; ttedge reads little-endian files")
    return reader


def _decode_metadata(reader: GGUFReader, file: Path) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # header counters (version, tensor and key counts) the reader exposes as fields
        try:
            metadata[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as err:
            raise CheckpointError(file, f"metadata key {key!r} is unreadable: {err}") from None
    return metadata


def _end_of_generation_ids(config: ModelConfig, metadata: dict[str, Any], file: Path) -> tuple[int, ...]:
    extra = [metadata[key] for key in _EXTRA_EOG_KEYS if key in metadata]
    try:
        return tuple(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(file, f"malformed end-of-generation token id: {err}") from None


def _rope_row_order(rows: int, heads: int) -> np.ndarray:
    """Row indices that turn llama.cpp's Q/K row order back into Hugging Face's.

    convert_hf_to_gguf.py stores ``w.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2)``,
    so stored row ``j`` is original row ``stored[j]``; the inverse permutation undoes it.
    """
    stored = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(stored)


def _stamp(file: Path) -> tuple[int, int]:
    stat = os.stat(file)
    return stat.st_size, stat.st_mtime_ns


def _check_unchanged(file: Path, stamp: tuple[int, int], tensor: str) -> None:
    # The file is memory-mapped: touching pages of a file truncated since opening would kill the
    # process with SIGBUS instead of raising, so refuse to read a file that has changed.
    try:
        changed = _stamp(file) != stamp
    except OSError as err:
        raise CheckpointError(file, f"cannot read tensor data: {err}", tensor=tensor) from None
    if changed:
        raise CheckpointError(file, "file changed on disk since it was opened; reopen it", tensor=tensor)


def _loader(
    tensor: ReaderTensor,
    file: Path,
    stamp: tuple[int, int],
    shape: tuple[int, ...],
    order: np.ndarray | None,
    keep_dtype: bool,
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        _check_unchanged(file, stamp, tensor.name)
        qtype = tensor.tensor_type
        try:
            if keep_dtype and qtype == GGMLQuantizationType.BF16:
                bits = np.asarray(tensor.data).view(np.int16).reshape(shape)
                return torch.from_numpy(_rows(bits, order)).view(torch.bfloat16)
            if keep_dtype and qtype == GGMLQuantizationType.F16:
                return torch.from_numpy(_rows(np.asarray(tensor.data).reshape(shape), order))
            values = dequantize(tensor.data, qtype).reshape(shape)
            return torch.from_numpy(_rows(values.astype(np.float32, copy=False), order))
        except (ValueError, TypeError, IndexError, OSError, NotImplementedError) as err:
            raise CheckpointError(file, f"cannot read tensor data: {err}", tensor=tensor.name) from None

    return load


def _rows(array: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``array`` in canonical row order, as a writable array that does not alias the file mapping."""
    if order is not None:
        return array[order]
    return np.require(array, requirements=["C", "W"])


def _block_reader(
    tensor: ReaderTensor,
    file: Path,
    stamp: tuple[int, int],
    shape: tuple[int, ...],
    order: np.ndarray | None,
) -> Callable[[], QuantizedBlocks]:
    def blocks() -> QuantizedBlocks:
        _check_unchanged(file, stamp, tensor.name)
        try:
            data = np.asarray(tensor.data).reshape(-1, tensor.data.shape[-1])
            return QuantizedBlocks(
                qtype=tensor.tensor_type.name, data=_rows(data, order), shape=(data.shape[0], shape[-1])
            )
        except (ValueError, TypeError, IndexError, OSError) as err:
            raise CheckpointError(file, f"cannot read tensor data: {err}", tensor=tensor.name) from None

    return blocks
