"""The on-disk cache of converted weights: later starts load ttnn's own tensor files instead of converting.

tt_transformers converts each weight with ``ttnn.as_tensor(..., cache_file_name=...)``. In the pinned ttnn
0.81.1 that function takes torch tensors only (its signature: ``tensor: torch.Tensor``, "TODO: add support
for numpy"), which ``.venv-tt`` lacks, writes its file in place (an interrupted conversion leaves a
truncated file behind) and trusts whatever file it finds. The same mechanism is used here through the
functions ``as_tensor`` itself calls, ``ttnn.dump_tensor`` and ``ttnn.load_tensor`` (flatbuffer
``.tensorbin`` files of host tensors), with three additions:

- **The key.** A cache directory is named after the model's identity and the mesh shape; each file after
  the tensor, its ttnn data type and layout (as ``as_tensor`` names them). A precision preset reaches the
  files through the dtype of each tensor, which is all a preset decides: changing the preset, the model, the
  mesh or ttnn's version changes the path, so a stale file is never found, and presets that agree on a
  tensor share its file.
- **Model identity** is the checkpoint files' resolved paths, sizes and modification times, with the
  model's configuration, the ttnn version and ``CACHE_FORMAT`` -- not a hash of the checkpoint's contents,
  which would read every byte of a multi-gigabyte checkpoint at every start, the very work the cache
  exists to skip. What it cannot see: a file rewritten in place with the same size and its old
  modification time restored. A copy of the checkpoint elsewhere converts again (a new path).
- **Integrity.** ttnn 0.81.1's loader refuses truncated files and broken headers, but loads a file with
  corrupted tensor data without complaint (measured). So each file is written under a temporary name and
  renamed into place, and its SHA-256 is written beside it the same way, last. A file whose digest is
  missing (an interrupted conversion) or differs (corruption), or that ttnn cannot load, is converted
  again, with a warning naming it.

Block-float conversion is done on the host and gives the same bytes for Wormhole and Blackhole (measured
with the n150 and p150 mock descriptors), so the device's architecture is not part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import ttnn

from ttedge.config import ModelConfig

log = logging.getLogger(__name__)

# Bump whenever ttedge.models.llama.tt.weights changes what a prepared tensor holds (its layout, padding,
# permutation, fusion): the cache key includes it, so files prepared the old way are never read again.
CACHE_FORMAT = 1
CACHE_DIR_VARIABLE = "TTEDGE_TT_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/ttedge/tt-weights"
# The mesh shape of one chip. On a 1xN mesh a split tensor is cached as one file per chip, under the mesh's
# own directory (``weights._cache_names``).
SINGLE_CHIP = (1, 1)

_DIGEST_CHUNK = 16 * 2**20


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR).expanduser()


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint's weights and configuration come from: a GGUF file, or a Hugging Face
    directory's safetensors shards and JSON files (config, shard index)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json"))


def model_identity(config: ModelConfig, files: Iterable[Path]) -> dict[str, object]:
    """What a converted weight depends on besides its own dtype, layout and the mesh (see the module doc)."""
    return {
        "cache_format": CACHE_FORMAT,
        "ttnn": metadata.version("ttnn"),
        "config": dataclasses.asdict(config),
        "files": [
            {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            for file in files
            for stat in [file.stat()]
        ],
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    # The temporary name keeps the suffix: ttnn.dump_tensor refuses a file not ending in ".tensorbin".
    temporary = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class WeightCache:
    """Converted host tensors of one model on one mesh shape, in ``root/<model>-<identity>/mesh<R>x<C>/``.

    ``converted`` and ``loaded`` count this object's misses and hits.
    """

    def __init__(self, root: Path, identity: dict[str, object], mesh_shape: tuple[int, int]):
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        config = identity["config"]
        assert isinstance(config, dict)
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", str(config["name"]))
        self.directory = root / f"{model}-{key}" / f"mesh{mesh_shape[0]}x{mesh_shape[1]}"
        self.directory.mkdir(parents=True, exist_ok=True)
        # For people looking into the cache: what this directory was converted from.
        identity_file = self.directory.parent / "identity.json"
        if not identity_file.exists():
            _write_atomically(identity_file, lambda p: p.write_text(json.dumps(identity, indent=2)))
        self.converted = 0
        self.loaded = 0

    def path(self, name: str, dtype: ttnn.DataType, layout: ttnn.Layout) -> Path:
        return self.directory / f"{name}_dtype_{dtype.name}_layout_{layout.name}.tensorbin"

    def load(self, name: str, dtype: ttnn.DataType, layout: ttnn.Layout) -> ttnn.Tensor | None:
        """The cached host tensor, or None when it must be converted (missing, incomplete or corrupt)."""
        path = self.path(name, dtype, layout)
        digest_path = path.with_name(path.name + ".sha256")
        if not path.exists():
            return None
        if not digest_path.exists():
            log.warning("%s has no digest (an interrupted conversion?): converting it again", path)
            return None
        if _file_digest(path) != digest_path.read_text().strip():
            log.warning("%s does not match its SHA-256 (corrupted): converting it again", path)
            return None
        try:
            tensor = ttnn.load_tensor(path)
        except RuntimeError as err:
            reason = str(err).splitlines()[0]
            log.warning("%s cannot be loaded by ttnn (%s): converting it again", path, reason)
            return None
        if tensor.dtype != dtype or tensor.layout != layout:
            log.warning("%s holds %s %s: converting it again", path, tensor.dtype, tensor.layout)
            return None
        self.loaded += 1
        return tensor

    def store(self, name: str, tensor: ttnn.Tensor) -> None:
        """Write a converted host tensor, then its digest (a file without one is never trusted)."""
        path = self.path(name, tensor.dtype, tensor.layout)
        _write_atomically(path, lambda p: ttnn.dump_tensor(p, tensor))
        digest = _file_digest(path)
        _write_atomically(path.with_name(path.name + ".sha256"), lambda p: p.write_text(digest + "\n"))
        self.converted += 1
