"""The seam between the engine and a device: what every backend's model runner offers.

Prefill, decode and verification are one operation at this level: each sequence contributes a run
of new tokens starting at the first position not yet in its KV cache, and asks for logits of its
last token (prefill, decode) or of every new token (verifying drafts). A backend may specialise
internally (trace the pure-decode case, for instance), but the engine and every big–little strategy
see one call. Rolling back is host-side: shrinking a sequence's computed length makes stale slots
unreadable, since attention only reads positions below it, and frees the blocks past it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ttedge.config import ModelConfig

if TYPE_CHECKING:
    # Annotations only: the TT backend's host side imports this module where torch is not installed
    # (the TT validation tier's .venv-tt).
    import torch

    from ttedge.runtime.kv_cache import BlockAllocator


class DeviceUnavailable(RuntimeError):
    """The device a backend needs is not there (no package to drive it, no card); a user error, not a bug."""


@dataclass(frozen=True)
class StepInput:
    token_ids: list[int]
    start: int  # position of token_ids[0]; every earlier position is already in the KV cache
    block_table: list[int]  # must already hold start + len(token_ids) tokens
    all_logits: bool = False


class ModelRunner(Protocol):
    config: ModelConfig
    allocator: BlockAllocator
    max_model_len: int
    # The most rows a step takes before the backend switches to a kernel that costs more per step (CPU
    # ``auto``: int4 up to 8 rows, bfloat16 above); drafts are not allowed to push a step past it. None =
    # no such threshold.
    cheap_rows: int | None

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        """One forward over every input; returns float32 logits per input, ``[n, vocab]`` with
        ``n = len(token_ids)`` when ``all_logits`` else 1."""
        ...


@runtime_checkable
class GreedyOnDevice(Protocol):
    """A runner that can pick greedy tokens where the logits are (on the card), so only token ids leave
    it; the engine uses it for steps where every sequence decodes greedily and wants no logprobs."""

    def run_greedy(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        """As ``run``, but each returned row's argmax token id, int64 ``[n]``, instead of its logits."""
        ...


@runtime_checkable
class VerifiesGreedyOnDevice(Protocol):
    """A runner that can also verify greedy drafts where the argmax ids are (on the card), so only an
    accepted length and a token per sequence leave it; the engine prefers it to ``GreedyOnDevice``."""

    def run_greedy_verify(self, inputs: list[StepInput], drafts: list[list[int]]) -> list[tuple[int, int]]:
        """One forward over every input, then per input ``(accepted, token)``: how many of ``drafts[i]``
        (the last ``len(drafts[i])`` of its token ids, with ``all_logits``) equal the model's argmax at the
        positions before them, and the model's argmax token after the accepted ones; for an input without
        drafts, ``(0, the argmax at its last token)``. What ``speculative.accept_greedy`` decides from
        ``run_greedy``'s ids."""
        ...
