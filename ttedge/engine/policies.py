"""Scheduling policies: who is admitted next, how much KV memory an admission holds, who is preempted.

``fcfs`` admits in arrival order, holds only the blocks a sequence's tokens need so far, and preempts
the most recently admitted sequence when memory runs out. ``length-aware`` uses each sequence's
predicted response length (``Sequence.predicted_output_len``):

- admission order: shortest predicted remaining work first, so short requests are not stuck behind
  long ones; a request's priority score shrinks linearly with its wait and reaches zero at
  ``max_wait_s``, after which it is *overdue* and goes ahead of every request that is not, in
  arrival order. A request that does not fit in the free memory yet is passed by smaller ones behind
  it until it is overdue; from then on nothing passes it, so it waits at most as long as it would
  under FCFS.
- admission memory: blocks for the prompt plus the predicted response are taken at admission, so a
  sequence whose prediction holds never asks for memory while running and never forces a
  preemption, and admission stops before memory is overcommitted. One that outgrows its prediction
  grows block by block, first into blocks other sequences reserved but have not reached yet (the
  scheduler does that for any policy), and only then by preempting.
- preemption: the running sequence with the longest predicted remaining response goes first (it
  would hold its memory longest); overdue sequences are preempted only when nothing else is left, so
  repeated preemption cannot starve a long request either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf
from typing import ClassVar

from ttedge.engine.sequence import Sequence


class SchedulingPolicy(ABC):
    name: ClassVar[str]
    # Whether the scheduler must obtain a response-length prediction before a sequence is admitted.
    needs_predictions: ClassVar[bool]

    @abstractmethod
    def admission_order(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        """The waiting sequences in the order they should be admitted."""

    @abstractmethod
    def admission_tokens(self, seq: Sequence, chunk_tokens: int) -> int:
        """How many tokens ``seq``'s block table must hold when it is admitted with a first chunk of
        ``chunk_tokens`` tokens."""

    @abstractmethod
    def may_be_passed(self, seq: Sequence, now: float) -> bool:
        """Whether sequences later in the admission order may be admitted while ``seq``, next in
        line, does not fit in the free memory."""

    @abstractmethod
    def choose_victim(self, running: SequenceOf[Sequence], now: float) -> Sequence:
        """The running sequence (in admission order) to preempt when memory runs out."""


class FcfsPolicy(SchedulingPolicy):
    name = "fcfs"
    needs_predictions = False

    def admission_order(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        # The queue is kept in arrival order with preempted sequences put back at its front.
        return list(waiting)

    def admission_tokens(self, seq: Sequence, chunk_tokens: int) -> int:
        return seq.num_computed + chunk_tokens

    def may_be_passed(self, seq: Sequence, now: float) -> bool:
        return False

    def choose_victim(self, running: SequenceOf[Sequence], now: float) -> Sequence:
        return running[-1]


class LengthAwarePolicy(SchedulingPolicy):
    name = "length-aware"
    needs_predictions = True

    def __init__(self, max_wait_s: float, order_by_length: bool = True, reserve: bool = True):
        if max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, got {max_wait_s}")
        self.max_wait_s = max_wait_s
        # Both halves can be switched off to measure what each one contributes.
        self.order_by_length = order_by_length
        self.reserve = reserve

    def admission_order(self, waiting: Iterable[Sequence], now: float) -> list[Sequence]:
        seqs = list(waiting)
        if not self.order_by_length:
            return sorted(seqs, key=lambda s: s.arrival_time)

        def key(seq: Sequence) -> tuple[bool, float, float]:
            overdue = self._overdue(seq, now)
            waited = now - seq.arrival_time
            score = 0.0 if overdue else remaining_estimate(seq) * (1.0 - waited / self.max_wait_s)
            return (not overdue, score, seq.arrival_time)

        return sorted(seqs, key=key)

    def admission_tokens(self, seq: Sequence, chunk_tokens: int) -> int:
        needed = seq.num_computed + chunk_tokens
        if not self.reserve:
            return needed
        return max(needed, len(seq.prompt_ids) + expected_output_len(seq))

    def may_be_passed(self, seq: Sequence, now: float) -> bool:
        # Smaller requests may use memory a large one cannot yet, until the large one is overdue.
        return not self._overdue(seq, now)

    def choose_victim(self, running: SequenceOf[Sequence], now: float) -> Sequence:
        def key(index: int) -> tuple[bool, int, int]:
            seq = running[index]
            overdue = self._overdue(seq, now)
            # Among overdue sequences the newest goes, as under FCFS, so the oldest always progresses.
            return (not overdue, remaining_estimate(seq) if not overdue else 0, index)

        return running[max(range(len(running)), key=key)]

    def _overdue(self, seq: Sequence, now: float) -> bool:
        return now - seq.arrival_time >= self.max_wait_s


def expected_output_len(seq: Sequence) -> int:
    """The response length to plan for: the prediction until the sequence outgrows it, then twice what
    it has produced (a run that has beaten its prediction is likely to be long), within max_tokens."""
    produced = len(seq.output_ids)
    predicted = seq.params.max_tokens if seq.predicted_output_len is None else seq.predicted_output_len
    if produced >= predicted:
        predicted = 2 * produced
    return max(1, min(predicted, seq.params.max_tokens))


def remaining_estimate(seq: Sequence) -> int:
    return max(1, expected_output_len(seq) - len(seq.output_ids))


POLICY_NAMES = (FcfsPolicy.name, LengthAwarePolicy.name)


def make_policy(name: str, max_wait_s: float) -> SchedulingPolicy:
    if name == FcfsPolicy.name:
        return FcfsPolicy()
    if name == LengthAwarePolicy.name:
        return LengthAwarePolicy(max_wait_s)
    raise ValueError(f"unknown scheduling policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
