"""Model cards: one TOML file per supported Llama-family model, in ``cards/``.

A card says what a checkpoint of the model must look like (the architecture numbers of its
``config.json``), how to run it on Tenstorrent hardware (precision presets, mesh shapes and, where
Tenstorrent publishes them, measured speeds), which smaller zoo models can draft for it, which
self-speculative draft (a subset of its own layers and an exit adapter, a file in ``drafts/``) ships
for it, and where a copy may already sit on disk. Checkpoint loaders use :func:`match_card` to
recognise a checkpoint by its numbers and :func:`check_against_card` to catch one that is not what its
name claims.

Cards are data, not code: a malformed card raises :class:`CardError` naming the file and the key,
so a typo in a card fails loudly instead of silently changing what the runtime believes.
"""

from __future__ import annotations

import difflib
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ttedge.config import ConfigError, ModelConfig, RopeScaling

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CARDS_DIR = Path(__file__).parent / "cards"
# Self-speculative drafts (ttedge/collab/exit_adapter.py), made by scripts/train_draft.py.
DRAFTS_DIR = Path(__file__).parent / "drafts"

TOKENIZER_FAMILIES = ("gpt2-bpe-smollm", "llama-spm", "llama3-bpe")
CHAT_TEMPLATES = ("chatml", "zephyr", "llama3")
TT_DTYPES = ("bfloat16", "bfloat8_b", "bfloat4_b")
# Chips in each system: a mesh shape must cover all of them.
TT_SYSTEMS = {"n150": 1, "n300": 2, "t3k": 8, "galaxy": 32, "p100": 1, "p150": 1}
CHECKPOINT_FORMATS = ("gguf", "safetensors")

# Numbers that fix every weight's shape or the maths of a forward pass: a checkpoint that differs
# in any of them is a different model. Context length and rope scaling are left out because
# converters rewrite them (GGUF often drops llama3 scaling into a rope_freqs tensor).
_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
)
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
# GGUF stores floats as float32, so 1e-5 comes back as 9.9999997e-06.
_FLOAT_REL_TOL = 1e-4


class CardError(ValueError):
    """A model card that cannot be used; names the card file and, where one is at fault, the key."""

    def __init__(self, file: str | Path, key: str | None, message: str):
        where = f"{file}" if key is None else f"{file} [{key}]"
        super().__init__(f"{where}: {message}")
        self.file = str(file)
        self.key = key


@dataclass(frozen=True)
class PrecisionPreset:
    """Weight and KV-cache data types for the TT backend (ttnn dtype names)."""

    name: str
    attention_weights: str
    mlp_weights: str
    kv_cache: str
    # (layer index, MLP dtype) pairs that differ from ``mlp_weights``.
    mlp_layer_overrides: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Deployment:
    """One way to run the model: a TT system, its mesh shape and the preset to use there.

    The ``published_*`` numbers are Tenstorrent's own measurements (batch 1), cited by the card's
    ``tt.source``; ``None`` where Tenstorrent publishes none.
    """

    system: str
    mesh_shape: tuple[int, int]
    preset: str
    max_context: int | None = None
    published_decode_tok_s_u: float | None = None
    published_ttft_ms: float | None = None


@dataclass(frozen=True)
class TTGuide:
    presets: tuple[PrecisionPreset, ...]
    # The first deployment is the recommended one.
    deployments: tuple[Deployment, ...]
    # Where the presets and published numbers come from; None when they are ttedge's own choice.
    source: str | None
    note: str

    def preset(self, name: str) -> PrecisionPreset:
        for preset in self.presets:
            if preset.name == name:
                return preset
        raise KeyError(f"no precision preset {name!r} (have: {', '.join(p.name for p in self.presets)})")


@dataclass(frozen=True)
class PackagedCheckpoint:
    """A checkpoint file shipped inside a Python distribution (found through its RECORD)."""

    distribution: str
    path: str  # as listed in the distribution's RECORD, '/'-separated
    format: str
    quantization: str | None
    install: str  # the command that installs it


@dataclass(frozen=True)
class ModelCard:
    id: str
    name: str
    hf_repo: str
    aliases: tuple[str, ...]
    parameters: int  # as published for the model, not computed
    tokenizer: str
    chat_template: str
    config: ModelConfig  # the card's architecture, named by the card id
    drafts: tuple[str, ...]  # card ids, best first
    draft_note: str
    self_draft: str | None  # a file name in DRAFTS_DIR
    tt: TTGuide
    packaged: tuple[PackagedCheckpoint, ...]
    sources: tuple[str, ...]
    file: Path

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the card answers to: id, display name, HF repo (with and without org), aliases."""
        return (self.id, self.name, self.hf_repo, self.hf_repo.rsplit("/", 1)[-1], *self.aliases)


def self_draft_path(card_id: str) -> Path | None:
    """The self-speculative draft file shipped for the card ``card_id``, or None when there is none.
    Read it with ``ttedge.collab.exit_adapter.load_self_draft``."""
    card = _zoo(CARDS_DIR).cards.get(card_id)
    if card is None:
        raise KeyError(f"no model card {card_id!r}")
    return None if card.self_draft is None else DRAFTS_DIR / card.self_draft


def load_cards(directory: Path | None = None) -> dict[str, ModelCard]:
    """All cards by id (parsed once per directory and cached); ``directory`` defaults to the zoo's."""
    return dict(_zoo(CARDS_DIR if directory is None else directory).cards)


def find_card(name: str) -> ModelCard | None:
    """The card whose id, display name, HF repo or alias is ``name`` (case-insensitive)."""
    return _zoo(CARDS_DIR).by_name.get(name.strip().lower())


def match_card(config: ModelConfig) -> ModelCard | None:
    """The card whose architecture numbers ``config`` has (shapes, rope theta, norm epsilon).

    Base and instruct variants, and Llama 3.1/3.3 70B, share their numbers: a match says which
    architecture a checkpoint has, not which weights.
    """
    for card in _zoo(CARDS_DIR).cards.values():
        if not _architecture_mismatches(config, card):
            return card
    return None


def check_against_card(
    config: ModelConfig, card: ModelCard, *, scaling_in_tensors: bool = False
) -> list[str]:
    """Every way ``config`` differs from ``card``, one readable line each; empty when it agrees.

    Set ``scaling_in_tensors`` when the checkpoint carries llama3 rope scaling as per-frequency
    factors (GGUF ``rope_freqs``) rather than in its metadata, so that a config without
    ``rope_scaling`` is not reported.
    """
    mismatches = _architecture_mismatches(config, card)
    expected = card.config
    if config.max_position_embeddings != expected.max_position_embeddings:
        mismatches.append(
            f"max_position_embeddings: checkpoint has {config.max_position_embeddings}, "
            f"card {card.id} says {expected.max_position_embeddings}"
        )
    if not (scaling_in_tensors and config.rope_scaling is None) and not _same_scaling(
        config.rope_scaling, expected.rope_scaling
    ):
        mismatches.append(
            f"rope_scaling: checkpoint has {_describe_scaling(config.rope_scaling)}, "
            f"card {card.id} says {_describe_scaling(expected.rope_scaling)}"
        )
    return mismatches


def load_card_file(path: Path) -> ModelCard:
    """Parse one card file, checking every key; cross-card checks (drafts, names) are in load_cards."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as bad:
        raise CardError(path, None, f"not valid TOML: {bad}") from None
    root = _Reader(path, data)
    card_id = root.text("id")
    if card_id != path.stem:
        raise root.error("id", f"{card_id!r} must equal the file name without .toml ({path.stem!r})")
    config = _read_architecture(root.table("architecture"), card_id)
    drafts = root.texts("drafts")
    draft_note = root.optional_text("draft_note")
    if not drafts and not draft_note:
        raise root.error("draft_note", "a card without drafts must say why in draft_note")
    card = ModelCard(
        id=card_id,
        name=root.text("name"),
        hf_repo=root.text("hf_repo"),
        aliases=root.texts("aliases"),
        parameters=root.positive_int("parameters"),
        tokenizer=root.choice("tokenizer", TOKENIZER_FAMILIES),
        chat_template=root.choice("chat_template", CHAT_TEMPLATES),
        config=config,
        drafts=drafts,
        draft_note=draft_note,
        self_draft=_read_self_draft(root),
        tt=_read_tt(root.table("tt"), config),
        packaged=tuple(_read_packaged(entry) for entry in root.tables("packaged")),
        sources=root.texts("sources"),
        file=path,
    )
    if "/" not in card.hf_repo:
        raise root.error("hf_repo", f"expected 'org/name', got {card.hf_repo!r}")
    root.finish()
    return card


@dataclass(frozen=True)
class _Zoo:
    cards: dict[str, ModelCard]
    by_name: dict[str, ModelCard]


@functools.cache
def _zoo(directory: Path) -> _Zoo:
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise CardError(directory, None, "no model cards (*.toml) in this directory")
    cards = {card.id: card for card in map(load_card_file, files)}
    by_name: dict[str, ModelCard] = {}
    for card in cards.values():
        for name in card.names:
            other = by_name.setdefault(name.lower(), card)
            if other is not card:
                raise CardError(card.file, "aliases", f"{name!r} already names card {other.id!r}")
    for card in cards.values():
        _check_drafts(card, cards)
    return _Zoo(cards, by_name)


def _read_self_draft(root: _Reader) -> str | None:
    name = root.optional_text("self_draft")
    if not name:
        return None
    # The zoo's own directory, not one next to the card: drafts ship with the package.
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise root.error("self_draft", f"expected a .safetensors file name in {DRAFTS_DIR}, got {name!r}")
    if not (DRAFTS_DIR / name).is_file():
        raise root.error("self_draft", f"no file {name!r} in {DRAFTS_DIR}")
    return name


def _check_drafts(card: ModelCard, cards: dict[str, ModelCard]) -> None:
    for draft_id in card.drafts:
        draft = cards.get(draft_id)
        if draft is None:
            raise CardError(card.file, "drafts", f"no card {draft_id!r} in the zoo")
        # A drafter's token ids must mean the same thing to the target for verification to be exact.
        if draft.tokenizer != card.tokenizer or draft.config.vocab_size != card.config.vocab_size:
            raise CardError(
                card.file,
                "drafts",
                f"{draft_id!r} has tokenizer {draft.tokenizer} with {draft.config.vocab_size} tokens, "
                f"this card {card.tokenizer} with {card.config.vocab_size}",
            )
        if draft.parameters >= card.parameters:
            raise CardError(card.file, "drafts", f"{draft_id!r} is not smaller than {card.id!r}")


def _architecture_mismatches(config: ModelConfig, card: ModelCard) -> list[str]:
    expected = card.config
    mismatches = []
    for name in _SHAPE_FIELDS:
        got, want = getattr(config, name), getattr(expected, name)
        if got != want:
            mismatches.append(f"{name}: checkpoint has {got}, card {card.id} says {want}")
    for name in _FLOAT_FIELDS:
        got, want = getattr(config, name), getattr(expected, name)
        if not math.isclose(got, want, rel_tol=_FLOAT_REL_TOL):
            mismatches.append(f"{name}: checkpoint has {got:g}, card {card.id} says {want:g}")
    return mismatches


def _same_scaling(a: RopeScaling | None, b: RopeScaling | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.kind == b.kind
        and a.original_max_position_embeddings == b.original_max_position_embeddings
        and all(
            math.isclose(getattr(a, f), getattr(b, f), rel_tol=_FLOAT_REL_TOL)
            for f in ("factor", "low_freq_factor", "high_freq_factor")
        )
    )


def _describe_scaling(scaling: RopeScaling | None) -> str:
    if scaling is None:
        return "none"
    return (
        f"{scaling.kind} (factor {scaling.factor:g}, low {scaling.low_freq_factor:g}, "
        f"high {scaling.high_freq_factor:g}, original {scaling.original_max_position_embeddings})"
    )


def _read_architecture(arch: _Reader, card_id: str) -> ModelConfig:
    scaling_table = arch.optional_table("rope_scaling")
    scaling = None
    if scaling_table is not None:
        scaling = RopeScaling(
            kind=scaling_table.choice("kind", ("linear", "llama3")),
            factor=scaling_table.number("factor"),
            low_freq_factor=scaling_table.number("low_freq_factor"),
            high_freq_factor=scaling_table.number("high_freq_factor"),
            original_max_position_embeddings=scaling_table.positive_int("original_max_position_embeddings"),
        )
        scaling_table.finish()
    config = ModelConfig(
        name=card_id,
        vocab_size=arch.positive_int("vocab_size"),
        hidden_size=arch.positive_int("hidden_size"),
        intermediate_size=arch.positive_int("intermediate_size"),
        num_layers=arch.positive_int("num_layers"),
        num_heads=arch.positive_int("num_heads"),
        num_kv_heads=arch.positive_int("num_kv_heads"),
        head_dim=arch.positive_int("head_dim"),
        rms_norm_eps=arch.number("rms_norm_eps"),
        rope_theta=arch.number("rope_theta"),
        max_position_embeddings=arch.positive_int("max_position_embeddings"),
        tie_word_embeddings=arch.flag("tie_word_embeddings"),
        rope_scaling=scaling,
    )
    arch.finish()
    try:
        return config.validate(str(arch.file))
    except ConfigError as bad:
        raise CardError(arch.file, "architecture", str(bad).removeprefix(f"{arch.file}: ")) from None


def _read_tt(tt: _Reader, config: ModelConfig) -> TTGuide:
    presets = tuple(_read_preset(entry, config) for entry in tt.tables("presets"))
    if not presets:
        raise tt.error("presets", "at least one precision preset is required")
    names = [p.name for p in presets]
    if len(set(names)) != len(names):
        raise tt.error("presets", f"preset names repeat: {names}")
    deployments = tuple(_read_deployment(entry, names) for entry in tt.tables("deployments"))
    if not deployments:
        raise tt.error("deployments", "at least one deployment is required")
    source = tt.optional_text("source") or None
    if source is None and any(
        d.published_decode_tok_s_u is not None or d.published_ttft_ms is not None for d in deployments
    ):
        raise tt.error("source", "published numbers need a source")
    guide = TTGuide(presets=presets, deployments=deployments, source=source, note=tt.optional_text("note"))
    tt.finish()
    return guide


def _read_preset(entry: _Reader, config: ModelConfig) -> PrecisionPreset:
    overrides_table = entry.optional_table("mlp_layer_overrides")
    overrides: list[tuple[int, str]] = []
    if overrides_table is not None:
        for key in overrides_table.data:
            if not key.isdigit() or int(key) >= config.num_layers:
                raise overrides_table.error(key, f"not a layer index below {config.num_layers}")
            overrides.append((int(key), overrides_table.choice(key, TT_DTYPES)))
        overrides.sort()
        overrides_table.finish()
    preset = PrecisionPreset(
        name=entry.text("name"),
        attention_weights=entry.choice("attention_weights", TT_DTYPES),
        mlp_weights=entry.choice("mlp_weights", TT_DTYPES),
        kv_cache=entry.choice("kv_cache", TT_DTYPES),
        mlp_layer_overrides=tuple(overrides),
    )
    entry.finish()
    return preset


def _read_deployment(entry: _Reader, preset_names: list[str]) -> Deployment:
    system = entry.choice("system", tuple(TT_SYSTEMS))
    shape = entry.positive_ints("mesh")
    if len(shape) != 2 or shape[0] * shape[1] != TT_SYSTEMS[system]:
        raise entry.error("mesh", f"{system} has {TT_SYSTEMS[system]} chips; got mesh {list(shape)}")
    deployment = Deployment(
        system=system,
        mesh_shape=(shape[0], shape[1]),
        preset=entry.choice("preset", tuple(preset_names)),
        max_context=entry.optional_positive_int("max_context"),
        published_decode_tok_s_u=entry.optional_number("published_decode_tok_s_u"),
        published_ttft_ms=entry.optional_number("published_ttft_ms"),
    )
    entry.finish()
    return deployment


def _read_packaged(entry: _Reader) -> PackagedCheckpoint:
    packaged = PackagedCheckpoint(
        distribution=entry.text("distribution"),
        path=entry.text("path"),
        format=entry.choice("format", CHECKPOINT_FORMATS),
        quantization=entry.optional_text("quantization") or None,
        install=entry.text("install"),
    )
    entry.finish()
    return packaged


_REQUIRED: Any = object()
_Number = TypeVar("_Number", int, float)


class _Reader:
    """Typed access to one TOML table that remembers which keys were read, so unknown ones are errors."""

    def __init__(self, file: Path, data: dict[str, Any], prefix: str = ""):
        self.file = file
        self.data = data
        self.prefix = prefix
        self._read: set[str] = set()

    def error(self, key: str, message: str) -> CardError:
        return CardError(self.file, f"{self.prefix}{key}", message)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt?)")

    def _get(self, key: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        self._read.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                # High cutoff: sibling keys such as num_heads / num_kv_heads must not pass for typos.
                unread = [k for k in self.data if k not in self._read]
                near = difflib.get_close_matches(key, unread, n=1, cutoff=0.88)
                hint = f" (is {near[0]!r} a misspelling?)" if near else ""
                raise self.error(key, f"required key is missing{hint}")
            return default
        value = self.data[key]
        # bool is an int subclass; a card that says `num_layers = true` is wrong, not 1.
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            raise self.error(key, f"expected {what}, got {value!r}")
        return value

    def text(self, key: str) -> str:
        value: str = self._get(key, (str,), "a string", _REQUIRED)
        return value

    def optional_text(self, key: str) -> str:
        value: str = self._get(key, (str,), "a string", "")
        return value

    def flag(self, key: str) -> bool:
        value: bool = self._get(key, (bool,), "true or false", _REQUIRED)
        return value

    def number(self, key: str) -> float:
        return self._positive(key, float(self._get(key, (int, float), "a number", _REQUIRED)))

    def optional_number(self, key: str) -> float | None:
        value = self._get(key, (int, float), "a number", None)
        return None if value is None else self._positive(key, float(value))

    def positive_int(self, key: str) -> int:
        value: int = self._get(key, (int,), "an integer", _REQUIRED)
        return self._positive(key, value)

    def optional_positive_int(self, key: str) -> int | None:
        value: int | None = self._get(key, (int,), "an integer", None)
        return None if value is None else self._positive(key, value)

    def _positive(self, key: str, value: _Number) -> _Number:
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, f"expected a positive number, got {value!r}")
        return value

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in allowed:
            raise self.error(key, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def texts(self, key: str) -> tuple[str, ...]:
        values = self._get(key, (list,), "a list of strings", [])
        if not all(isinstance(v, str) for v in values):
            raise self.error(key, f"expected a list of strings, got {values!r}")
        return tuple(values)

    def positive_ints(self, key: str) -> tuple[int, ...]:
        values = self._get(key, (list,), "a list of integers", _REQUIRED)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise self.error(key, f"expected a list of positive integers, got {values!r}")
        return tuple(values)

    def optional_table(self, key: str) -> _Reader | None:
        value = self._get(key, (dict,), "a table", None)
        return None if value is None else _Reader(self.file, value, f"{self.prefix}{key}.")

    def table(self, key: str) -> _Reader:
        value = self._get(key, (dict,), "a table", _REQUIRED)
        return _Reader(self.file, value, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[_Reader]:
        values = self._get(key, (list,), "an array of tables", [])
        if not all(isinstance(v, dict) for v in values):
            raise self.error(key, f"expected an array of tables ([[{key}]]), got {values!r}")
        return [_Reader(self.file, v, f"{self.prefix}{key}[{i}].") for i, v in enumerate(values)]
