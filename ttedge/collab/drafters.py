"""Drafters: cheap guesses of a sequence's next tokens, which the big model then verifies in one forward.

Every drafter answers the same question — given the tokens so far, what comes next, up to ``n``
tokens — so every strategy (speculative verification, BiLD) runs with any of them. A drafter whose
proposal is a function of the context alone (``deterministic``) puts all its probability on the
tokens it proposes, which is what lossless rejection sampling needs to know about it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np


class Drafter(Protocol):
    name: ClassVar[str]
    # True when the proposal is fixed by the context (no sampling): its distribution is one-hot.
    deterministic: ClassVar[bool]

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` guesses of the tokens that follow ``tokens`` (prompt and output so
        far); fewer, or none, when the drafter has nothing worth verifying."""
        ...


class PromptLookupDrafter:
    """n-gram lookup in the sequence's own context ("prompt lookup decoding").

    Finds the most recent earlier occurrence of the context's last ``n`` tokens, for the longest ``n``
    from ``max_ngram`` down to ``min_ngram`` that occurs, and proposes what followed it. Costs no
    model call at all, and pays off where outputs copy their input: summaries, code edits,
    extraction, quoted answers, and the loops greedy decoding falls into.
    """

    name: ClassVar[str] = "prompt-lookup"
    deterministic: ClassVar[bool] = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_lookback: int = 4096):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        # Bounds the scan per step on long contexts; matches further back are rarely the useful ones.
        self.max_lookback = max_lookback

    def propose(self, tokens: list[int], max_tokens: int) -> list[int]:
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


# Drafters by the name `--speculative` takes, each built with its defaults.
DRAFTERS: dict[str, Callable[[], Drafter]] = {PromptLookupDrafter.name: PromptLookupDrafter}
