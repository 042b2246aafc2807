"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ttedge.collab.strategies import Route, Strategy
from ttedge.engine.sampling import SamplingParams, TokenLogprobs


class TextStream(Protocol):
    """Turns generated token ids into text one token at a time, never splitting a character."""

    def add(self, token_id: int) -> str: ...

    def finish(self) -> str:
        """Whatever is still held back when the sequence ends."""
        ...


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-sequence token, stop token or stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the caller


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    text_stream: TextStream
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Text produced so far, with any stop string cut off; `emitted` chars of it were returned.
    text: str = ""
    emitted: int = 0
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the KV cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Response length (tokens) the scheduler's length predictor expects; None until predicted.
    predicted_output_len: int | None = None
    generator: torch.Generator | None = None
    # Speculative decoding: drafts to verify at this sequence's next step (adapted to its acceptance;
    # None until its first draft), and decode steps since drafting was paused (budget 0).
    draft_budget: int | None = None
    steps_without_drafts: int = 0
    strategy: Strategy = Strategy.PLAIN
    # The small model writes this sequence's tokens (guided after its first tokens, routed to small).
    # The scheduler still reserves the big model's blocks for it, so it can be handed back any step.
    on_small_model: bool = False
    route: Route | None = None  # routed: the model that answers, once decided

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_ids)
        if end <= prompt_len:
            return self.prompt_ids[start:end]
        if start >= prompt_len:
            return self.output_ids[start - prompt_len : end - prompt_len]
        return self.prompt_ids[start:] + self.output_ids[: end - prompt_len]

    def append_text(self, piece: str) -> bool:
        """Add decoded text; returns True when a stop string ended the sequence."""
        search_from = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text += piece
        for stop in self.params.stop:
            found = self.text.find(stop, search_from)
            if found != -1:
                self.text = self.text[:found]
                return True
        return False

    def take_new_text(self) -> str:
        """Text not yet returned, holding back a tail that could still grow into a stop string."""
        limit = len(self.text)
        if not self.is_finished:
            limit -= _stop_prefix_overlap(self.text, self.params.stop)
        new = self.text[self.emitted : max(limit, self.emitted)]
        self.emitted += len(new)
        return new


def _stop_prefix_overlap(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best
