"""The small model of big–little collaboration, on its own runner and KV cache.

It drafts greedily for speculative decoding and BiLD, writes whole answers for guided and routed
generation, and probes a prompt's difficulty for routing. It runs on any ``ModelRunner`` — on this
machine the CPU backend, beside a big model on CPU or on a Tenstorrent card — so drafting stays on the
host while the accelerator verifies.

Its KV cache follows each sequence lazily: every call passes the sequence's tokens so far, and the
cache keeps the longest prefix it already holds, so a rejected draft is rolled back by simply not
matching (attention reads only positions below the fed length, and later tokens overwrite the stale
slots). When its memory runs out it forgets the least recently used other sequences; a sequence that
still does not fit gets no draft, or goes back to the big model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ttedge.collab.drafters import Draft, DraftRequest
from ttedge.runtime.base import ModelRunner, StepInput
from ttedge.runtime.kv_cache import OutOfBlocks


@dataclass
class _CachedSequence:
    block_table: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose keys and values are in the cache


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.argmin(np.asarray(a[:n]) == np.asarray(b[:n])))


class ModelDrafter:
    # Drafts are the small model's argmax, a function of the context: one-hot for rejection sampling.
    deterministic = True

    def __init__(self, runner: ModelRunner, name: str):
        self.runner = runner
        self.name = name
        self._cached: OrderedDict[str, _CachedSequence] = OrderedDict()  # least recently used first

    @property
    def num_cached_sequences(self) -> int:
        return len(self._cached)

    def release(self, key: str) -> None:
        cached = self._cached.pop(key, None)
        if cached is not None:
            self.runner.allocator.free(cached.block_table)

    def next_logits(self, contexts: Sequence[tuple[str, list[int]]]) -> list[torch.Tensor | None]:
        """The small model's next-token logits ``[vocab]`` after each ``(key, tokens)`` context, from one
        forward; None for a sequence its KV cache cannot hold."""
        reserved = self._reserve([(key, len(tokens)) for key, tokens in contexts])
        return self._feed([(key, tokens) for key, tokens in contexts], reserved)

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """Greedy drafts, one batched forward per drafted position."""
        drafts = [Draft() for _ in requests]
        reserved = self._reserve([(r.key, len(r.tokens) + r.max_tokens) for r in requests])
        active = [i for i, r in enumerate(requests) if reserved[i] and r.max_tokens > 0]
        contexts = {i: requests[i].tokens for i in active}
        while active:
            logits = self._feed([(requests[i].key, contexts[i]) for i in active], [True] * len(active))
            probs = torch.softmax(torch.stack([row for row in logits if row is not None]), dim=-1)
            confidences, tokens = probs.max(dim=-1)
            still_active = []
            for i, token, confidence in zip(active, tokens.tolist(), confidences.tolist(), strict=True):
                draft, request = drafts[i], requests[i]
                if confidence < request.min_confidence:
                    draft.unsure = True
                    continue
                draft.tokens.append(token)
                draft.confidences.append(confidence)
                if len(draft.tokens) < request.max_tokens:
                    contexts[i] = contexts[i] + [token]
                    still_active.append(i)
            active = still_active
        return drafts

    def _reserve(self, wants: list[tuple[str, int]]) -> list[bool]:
        """Grow each key's block table to hold its token count, forgetting the least recently used
        sequences outside this call when memory runs out; False for a key that does not fit."""
        allocator = self.runner.allocator
        in_call = {key for key, _ in wants}
        fits = []
        for key, num_tokens in wants:
            cached = self._cached.setdefault(key, _CachedSequence())
            self._cached.move_to_end(key)
            while True:
                try:
                    allocator.grow_table(cached.block_table, num_tokens)
                    fits.append(True)
                    break
                except OutOfBlocks:
                    victim = next((k for k in self._cached if k not in in_call), None)
                    if victim is None:
                        self.release(key)
                        fits.append(False)
                        break
                    self.release(victim)
        return fits

    def _feed(self, contexts: list[tuple[str, list[int]]], reserved: list[bool]) -> list[torch.Tensor | None]:
        """One forward over every reserved context's tokens not yet in the cache (at least its last
        token, whose logits are wanted)."""
        inputs = []
        for (key, tokens), ok in zip(contexts, reserved, strict=True):
            if not ok:
                continue
            cached = self._cached[key]
            start = min(common_prefix_len(cached.fed, tokens), len(tokens) - 1)
            inputs.append(StepInput(tokens[start:], start, cached.block_table))
            cached.fed = cached.fed[:start] + tokens[start:]
        rows = iter(self.runner.run(inputs) if inputs else [])
        return [next(rows)[0] if ok else None for ok in reserved]
