"""Lossless speculative decoding: the big model checks a drafter's guesses in one forward.

A sequence in decode feeds its last token and ``k`` draft tokens; the big model returns logits for all
``k + 1`` positions at once, where plain decoding would need ``k + 1`` steps. Verification keeps the
longest prefix of the drafts the big model agrees with and adds one token of its own, so every step
yields between 1 and ``k + 1`` tokens.

- Greedy: a draft is accepted while it equals the big model's argmax at its position; the output is
  the big model's greedy output token for token.
- Sampling: rejection sampling (Leviathan et al., Chen et al.). With a deterministic drafter, whose
  distribution ``q`` is one-hot on the draft ``d``, draft ``d`` is accepted with probability
  ``min(1, p(d) / q(d)) = p(d)``; on rejection the token is drawn from ``(p - q)+`` normalised, which
  is ``p`` with ``d`` removed. Each emitted token is then distributed exactly as ``p``, the big model's
  filtered distribution (temperature, top-k, top-p), whatever the drafts were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ttedge.engine.sampling import SamplingParams, draw, filtered_probs

if TYPE_CHECKING:
    from ttedge.collab.strategies import CollabConfig


def verify(
    logits: torch.Tensor,
    drafts: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """The tokens a sequence emits this step, given the big model's ``logits`` ``[len(drafts) + 1, vocab]``
    at the positions of its last token and each draft: the accepted drafts, then one token of the big
    model's (a correction where a draft was rejected, or a bonus token after all of them)."""
    if logits.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} rows of logits, got {logits.shape[0]}")
    if params.greedy:
        return accept_greedy(logits.argmax(dim=-1).tolist(), drafts)
    probs = filtered_probs(logits, [params] * logits.shape[0])
    emitted: list[int] = []
    for position, draft in enumerate(drafts):
        if float(torch.rand((), generator=generator)) < float(probs[position, draft]):
            emitted.append(draft)
            continue
        residual = probs[position].clone()
        residual[draft] = 0.0
        emitted.append(draw(residual, generator))
        return emitted
    emitted.append(draw(probs[-1], generator))
    return emitted


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Greedy verification from the big model's argmax ``targets`` at the last token and each draft
    (``len(drafts) + 1`` of them): the drafts up to the first disagreement, then the big model's token."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return [*drafts[:accepted], targets[accepted]]


def next_draft_budget(budget: int, drafted: int, accepted: int, config: CollabConfig) -> int:
    """A sequence's draft budget after a verification, adapted as Hugging Face's assisted generation does:
    two more after a fully accepted draft, one fewer after a rejection, at most the configured k. Unlike
    there it reaches 0 (drafting paused, see ``pause_steps``): verifying costs a row per draft for every
    sequence in the batch, so a sequence whose drafts keep failing should stop paying for them."""
    if not config.adaptive:
        return config.num_draft_tokens
    if accepted == drafted:
        return min(config.num_draft_tokens, budget + 2)
    return max(0, budget - 1)
