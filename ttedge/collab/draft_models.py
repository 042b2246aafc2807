"""Which drafter ``--draft`` names, and how it is built beside the big model.

- ``prompt-lookup``: n-gram lookup in the context, no model.
- ``self``: the self-speculative draft shipped for the big model's card (``model_zoo/drafts/``): some of
  its layers and a trained exit adapter, sharing its weights.
- ``self:LAYERS``: the big model's own layers ``LAYERS`` (``0-5,29``), sharing its weights on CPU;
  a self-draft with no exit adapter.
- ``PATH.safetensors``: a self-draft file made by ``scripts/train_draft.py``.
- ``PATH``: another checkpoint (a ``.gguf`` file or a Hugging Face directory) with the big model's
  vocabulary: a separate small model.

The draft model always runs on the CPU backend: beside a big model on CPU here, or on the host while
a Tenstorrent card runs the big model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ttedge import model_zoo
from ttedge.checkpoint import load_checkpoint
from ttedge.checkpoint.base import Checkpoint
from ttedge.collab.drafters import Drafter, PromptLookupDrafter
from ttedge.collab.exit_adapter import load_self_draft
from ttedge.collab.model_drafter import ModelDrafter
from ttedge.config import ModelConfig
from ttedge.models.llama.linear import WeightFormat
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.kv_cache import KVCacheSpec

SHIPPED_SELF_DRAFT = "self"
SELF_PREFIX = "self:"
_LAYER_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class DraftSpecError(ValueError):
    """``--draft`` names nothing usable; the message says what it expects."""


@dataclass(frozen=True)
class DraftSpec:
    text: str  # as given, for logs and errors
    layers: tuple[int, ...] | None = None  # self-draft: the big model's layers it keeps
    path: Path | None = None  # a self-draft file, or a separate small model's checkpoint
    shipped: bool = False  # the self-draft shipped for the big model's card

    @property
    def needs_model(self) -> bool:
        return self.layers is not None or self.path is not None or self.shipped

    @property
    def is_self_draft_file(self) -> bool:
        return self.shipped or (self.path is not None and self.path.suffix == ".safetensors")


def parse_draft_spec(text: str) -> DraftSpec:
    """Check ``--draft`` before any model loads."""
    if text == PromptLookupDrafter.name:
        return DraftSpec(text)
    if text == SHIPPED_SELF_DRAFT:
        return DraftSpec(text, shipped=True)
    if text.startswith(SELF_PREFIX):
        return DraftSpec(text, layers=_parse_layers(text[len(SELF_PREFIX) :], text))
    path = Path(text)
    if not path.exists():
        raise DraftSpecError(
            f"--draft {text!r}: expected {PromptLookupDrafter.name!r}, {SHIPPED_SELF_DRAFT!r}, "
            f"{SELF_PREFIX}LAYERS (e.g. self:0-5,29), a self-draft file or the path of a checkpoint "
            "sharing the model's vocabulary, and no such file exists"
        )
    return DraftSpec(text, path=path)


def _parse_layers(text: str, spec: str) -> tuple[int, ...]:
    layers: list[int] = []
    for part in text.split(","):
        match = _LAYER_RANGE.match(part.strip())
        if match is None:
            raise DraftSpecError(f"--draft {spec!r}: {part!r} is not a layer index or range like 0-5")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise DraftSpecError(f"--draft {spec!r}: the range {part!r} runs backwards")
        layers.extend(range(first, last + 1))
    if layers != sorted(set(layers)):
        raise DraftSpecError(f"--draft {spec!r}: layers must be listed in increasing order, without repeats")
    return tuple(layers)


def build_drafter(
    spec: DraftSpec,
    target_checkpoint: Checkpoint,
    target_model: LlamaModel | None,
    weight_format: str,
    num_kv_blocks: int,
) -> Drafter:
    """The drafter ``spec`` names. A self-draft shares ``target_model``'s weights when the big model
    runs on CPU, and loads those layers from ``target_checkpoint`` otherwise. Its KV cache holds
    ``num_kv_blocks`` blocks, as many tokens as the big model's."""
    if not spec.needs_model:
        return PromptLookupDrafter()
    target_config = target_checkpoint.config
    if spec.layers is not None and spec.layers[-1] >= target_config.num_layers:
        raise DraftSpecError(f"--draft {spec.text!r}: the model has layers 0-{target_config.num_layers - 1}")
    if spec.layers is not None or spec.is_self_draft_file:
        self_draft = None
        layers = spec.layers
        if layers is None:
            dtype = target_model.dtype if target_model else WeightFormat(weight_format).activation_dtype
            path = spec.path or _shipped_self_draft(spec, target_config)
            self_draft = load_self_draft(path, target_config, dtype)
            layers = self_draft.layer_indices
        if target_model is not None:
            draft = self_draft.draft_model(target_model) if self_draft else target_model.layer_subset(layers)
        else:
            # The big model runs elsewhere (a card, other ranks): read only the draft's own layers.
            own_layers = LlamaModel.from_checkpoint(target_checkpoint.layers_only(layers), weight_format)
            draft = own_layers.layer_subset(range(len(layers)), self_draft.adapter if self_draft else None)
    else:
        assert spec.path is not None
        draft = LlamaModel.from_checkpoint(load_checkpoint(spec.path), weight_format)
        if draft.config.vocab_size != target_config.vocab_size:
            raise DraftSpecError(
                f"--draft {spec.text!r}: its vocabulary has {draft.config.vocab_size} tokens, the model's "
                f"{target_config.vocab_size}; a draft must share the big model's tokenizer"
            )
    config = draft.config
    block_bytes = KVCacheSpec(
        config.num_layers, config.num_kv_heads, config.head_dim, draft.dtype
    ).bytes_per_block()
    runner = CpuModelRunner(draft, num_kv_blocks * block_bytes, target_config.max_position_embeddings)
    return ModelDrafter(runner, spec.text)


def _shipped_self_draft(spec: DraftSpec, target_config: ModelConfig) -> Path:
    card = model_zoo.match_card(target_config)
    path = None if card is None else model_zoo.self_draft_path(card.id)
    if path is None:
        raise DraftSpecError(
            f"--draft {spec.text!r}: no self-draft ships for this model; "
            f"give {SELF_PREFIX}LAYERS or a draft file"
        )
    return path
