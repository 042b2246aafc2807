"""Drafters: cheap guesses of sequences' next tokens, which the big model then verifies in one forward.

Every drafter answers the same question for a batch of sequences — given the tokens so far, what comes
next, up to ``n`` tokens — so every strategy (speculative verification, BiLD) runs with any of them.
A drafter whose proposal is a function of the context alone (``deterministic``) puts all its
probability on the tokens it proposes, which is what lossless rejection sampling needs to know about
it. Drafters that run a model keep per-sequence state (a KV cache) under the sequence's key until
``release``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class DraftRequest:
    key: str  # the sequence's request id: a model drafter keeps its KV cache under it
    tokens: list[int]  # prompt and output so far
    max_tokens: int
    # Stop before a token the drafter gives less than this probability (BiLD's fallback); 0 = never.
    min_confidence: float = 0.0


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # The drafter's probability of each drafted token; 1.0 from drafters without a distribution.
    confidences: list[float] = field(default_factory=list)
    # The draft ended because the next token fell below ``min_confidence`` (a BiLD fallback).
    unsure: bool = False


class Drafter(Protocol):
    name: str
    # True when the proposal is fixed by the context (no sampling): its distribution is one-hot.
    deterministic: bool

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """Up to ``max_tokens`` guesses of the tokens that follow each request's tokens; fewer, or
        none, when the drafter has nothing worth verifying."""
        ...

    def release(self, key: str) -> None:
        """Forget the sequence ``key`` (finished or aborted)."""
        ...


class PromptLookupDrafter:
    """n-gram lookup in the sequence's own context ("prompt lookup decoding").

    Finds the most recent earlier occurrence of the context's last ``n`` tokens, for the longest ``n``
    from ``max_ngram`` down to ``min_ngram`` that occurs, and proposes what followed it. Costs no
    model call at all, and pays off where outputs copy their input: summaries, code edits,
    extraction, quoted answers, and the loops greedy decoding falls into.
    """

    name = "prompt-lookup"
    deterministic = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_lookback: int = 4096):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # Bounds the scan per step on long contexts; matches further back are rarely the useful ones.
        self.max_lookback = max_lookback

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = []
        for request in requests:
            tokens = self.lookup(request.tokens, request.max_tokens)
            drafts.append(Draft(tokens, [1.0] * len(tokens)))
        return drafts

    def release(self, key: str) -> None:
        pass  # no per-sequence state

    def lookup(self, tokens: list[int], max_tokens: int) -> list[int]:
        """What followed the latest longest earlier match of ``tokens``' tail, up to ``max_tokens``."""
        if max_tokens <= 0:
            return []
        context = np.asarray(tokens[-self.max_lookback :])
        # Where an earlier occurrence of the last token ends an n-gram match; the context's last
        # position is left out, so every match has a token after it.
        ends = np.flatnonzero(context[:-1] == context[-1])
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            matches = ends[ends >= n - 1]
            for back in range(1, n):
                matches = matches[context[matches - back] == context[-1 - back]]
            if matches.size:
                follows = int(matches[-1]) + 1
                return context[follows : follows + max_tokens].tolist()
        return []
