"""Big–little strategies: which model produces a sequence's tokens, and how the other one checks.

- ``plain``: the big model alone.
- ``speculative`` (lossless): the drafter guesses up to k tokens, the big model verifies them in one
  forward (``speculative.verify``); output distributed exactly as the big model's.
- ``bild`` (Kim et al., "Speculative Decoding with Big Little Decoder"): the small model drafts until
  its confidence in the next token falls below ``fallback_threshold`` (a *fallback*), the big model
  then runs once over the pending tokens and keeps them up to the first whose cross-entropy under its
  own distribution exceeds ``rollback_threshold`` (a *rollback*), where its own token replaces the
  draft's. Not lossless: a draft the big model finds plausible but would not have picked is kept.
- ``guided`` (GKT, "Big model writes the first words"): the big model writes the first
  ``guided_tokens`` tokens, the small model completes the answer alone.
- ``routed``: the small model drafts a probe of ``route_probe_tokens`` tokens from the prompt; if its
  mean confidence reaches ``route_threshold`` it answers alone, otherwise the big model does.

Every strategy but ``plain`` and prompt-lookup ``speculative`` needs a small model (``ModelDrafter``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from ttedge.collab.drafters import Drafter
from ttedge.collab.model_drafter import ModelDrafter
from ttedge.engine.sampling import SamplingParams, draw, filtered_probs


class Strategy(str, enum.Enum):
    PLAIN = "plain"
    SPECULATIVE = "speculative"
    BILD = "bild"
    GUIDED = "guided"
    ROUTED = "routed"

    @property
    def drafts(self) -> bool:
        return self in (Strategy.SPECULATIVE, Strategy.BILD)

    @property
    def needs_small_model(self) -> bool:
        return self in (Strategy.BILD, Strategy.GUIDED, Strategy.ROUTED)


class Route(str, enum.Enum):
    """Which model answers a routed request."""

    SMALL = "small"
    BIG = "big"


@dataclass(frozen=True)
class CollabConfig:
    drafter: Drafter
    default_strategy: Strategy = Strategy.SPECULATIVE
    num_draft_tokens: int = 4  # k: the most drafts verified per sequence and step (also BiLD's)
    # speculative: adapt each sequence's k to its acceptance (``next_draft_budget``); False = always k.
    adaptive: bool = True
    # speculative, adaptive: a sequence whose single draft was rejected pauses drafting this many steps.
    pause_steps: int = 8
    fallback_threshold: float = 0.5  # bild: α_FB, the small model's least probability to keep drafting
    rollback_threshold: float = 2.0  # bild: α_RB, in nats of the big model's cross-entropy of a draft
    guided_tokens: int = 8  # guided: tokens the big model writes before the small one takes over
    route_probe_tokens: int = 8  # routed: greedy tokens of the small model that measure its confidence
    route_threshold: float = 0.6  # routed: mean probe confidence from which the small model answers

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be at least 1, got {self.num_draft_tokens}")
        if not self.drafter.deterministic:
            # Rejection sampling assumes q is one-hot on the draft.
            raise ValueError(
                f"drafter {self.drafter.name!r} samples its drafts; it needs q-aware verification"
            )
        if not 0.0 <= self.fallback_threshold <= 1.0:
            raise ValueError(f"fallback_threshold is a probability, got {self.fallback_threshold}")
        if self.rollback_threshold < 0.0:
            raise ValueError(f"rollback_threshold is a cross-entropy (>= 0), got {self.rollback_threshold}")
        if self.guided_tokens < 1 or self.route_probe_tokens < 1:
            raise ValueError("guided_tokens and route_probe_tokens must be at least 1")
        self.check(self.default_strategy)

    @property
    def small_model(self) -> ModelDrafter | None:
        return self.drafter if isinstance(self.drafter, ModelDrafter) else None

    def check(self, strategy: Strategy) -> None:
        """Refuse a strategy this configuration cannot run."""
        if strategy.needs_small_model and self.small_model is None:
            raise ValueError(
                f"strategy {strategy.value!r} needs a small model; the drafter is {self.drafter.name!r}"
            )


@dataclass
class CollabCounters:
    """Totals since start, for /metrics."""

    draft_tokens: int = 0  # drafts verified by the big model (speculative and bild)
    accepted_draft_tokens: int = 0
    fallbacks: int = 0  # bild: drafts cut short by the small model's low confidence
    rollbacks: int = 0  # bild: drafts the big model overruled
    routed_small: int = 0
    routed_big: int = 0
    small_model_tokens: int = 0  # tokens the small model wrote alone (guided, routed)


def bild_accept(
    logits: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    rollback_threshold: float,
) -> tuple[list[int], bool]:
    """BiLD's rollback: the tokens a sequence emits given the big model's ``logits``
    ``[len(drafts) + 1, vocab]``, and whether a draft was rolled back. Drafts are kept up to the first
    whose cross-entropy ``-log p_big(draft)`` exceeds ``rollback_threshold``; the big model's own token
    (its argmax, or a sample under ``params``) follows the kept drafts."""
    if logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} rows of logits, got {logits.shape[0]}")
    kept = len(drafts)
    if drafts:
        rows = torch.arange(len(drafts))
        cross_entropy = -torch.log_softmax(logits[:-1].float(), dim=-1)[rows, torch.tensor(drafts)]
        too_far = (cross_entropy > rollback_threshold).nonzero()
        if too_far.numel():
            kept = int(too_far[0])
    row = logits[kept : kept + 1]
    if params.greedy:
        own = int(row.argmax())
    else:
        own = draw(filtered_probs(row, [params])[0], generator)
    return [*drafts[:kept], own], kept < len(drafts)
