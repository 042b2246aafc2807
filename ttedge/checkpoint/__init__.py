"""Checkpoint readers: Hugging Face safetensors directories and GGUF files, behind one API.

``load_checkpoint(path)`` opens a checkpoint, checks that every tensor the config implies is
present with the right shape, and returns a ``Checkpoint`` whose tensors are read lazily, by
canonical name (see ``ttedge.checkpoint.base``). Format-specific metadata:

- Hugging Face: ``metadata["tokenizer_config"]`` (tokenizer_config.json, chat template included)
  and ``metadata["generation_config"]``; ``tokenizer_path`` is the directory holding tokenizer.json.
- GGUF: ``metadata`` is the file's key/value pairs under their GGUF keys (``tokenizer.ggml.*``,
  ``tokenizer.chat_template``, ...); ``tokenizer_path`` is the GGUF file.
"""

from __future__ import annotations

import os
from pathlib import Path

from ttedge.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    QuantizedBlocks,
    TensorSource,
    canonical_shapes,
    optional_shapes,
)
from ttedge.checkpoint.gguf_reader import SUPPORTED_TYPES as SUPPORTED_GGUF_TYPES
from ttedge.checkpoint.gguf_reader import open_gguf_checkpoint
from ttedge.checkpoint.safetensors_reader import CONFIG_FILE, open_hf_checkpoint

__all__ = [
    "SUPPORTED_GGUF_TYPES",
    "Checkpoint",
    "CheckpointError",
    "QuantizedBlocks",
    "TensorSource",
    "canonical_shapes",
    "load_checkpoint",
    "optional_shapes",
]

_EXPECTED = (
    "expected a Hugging Face model directory (config.json, model.safetensors or "
    "model.safetensors.index.json with its shards, tokenizer.json), a .gguf file, "
    "or a directory holding exactly one .gguf file"
)


def load_checkpoint(path: str | os.PathLike[str], *, keep_dtype: bool = False) -> Checkpoint:
    """Open the checkpoint at ``path``; tensor data is read only by ``TensorSource.load()``.

    ``load()`` returns float32 unless ``keep_dtype`` is set, in which case tensors stored as
    F16/BF16 come back in that dtype (block-quantised GGUF tensors are always dequantised to float32).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(path, f"not a .gguf file; {_EXPECTED}")
        return open_gguf_checkpoint(path, keep_dtype=keep_dtype)
    if not path.is_dir():
        raise CheckpointError(path, f"no such file or directory; {_EXPECTED}")
    if (path / CONFIG_FILE).is_file():
        return open_hf_checkpoint(path, keep_dtype=keep_dtype)
    ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if not ggufs and any(path.glob("*.safetensors*")):
        raise CheckpointError(path / CONFIG_FILE, "missing: a Hugging Face checkpoint needs config.json")
    if len(ggufs) == 1:
        return open_gguf_checkpoint(ggufs[0], keep_dtype=keep_dtype)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise CheckpointError(path, f"holds several .gguf files ({names}); pass the one to load")
    raise CheckpointError(path, f"neither config.json nor a .gguf file found; {_EXPECTED}")
