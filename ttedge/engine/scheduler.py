"""Who runs in the next step: admission, chunked prefill, and preemption when KV blocks run out.

Each step has a token budget. Running sequences that are decoding go first (one token each), so a
long prompt never stalls users who are already streaming; prompts are then prefilled in chunks
with what remains of the budget. When a running sequence needs a block and none is free, it takes
one that another sequence holds beyond its tokens (a reservation, see ``policies.py``); if there is
none, the policy picks a running sequence to preempt: its blocks are freed and it goes back to the
queue to be recomputed later. Nothing is ever dropped for lack of memory.

The policy (``policies.py``) decides the admission order, how many blocks an admission takes and the
preemption victim; this module applies its choices within the step budget and ``max_num_seqs``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ttedge.engine.length_predictor import DEFAULT_WEIGHTS, LengthPredictor
from ttedge.engine.policies import POLICY_NAMES, SchedulingPolicy, make_policy
from ttedge.engine.sequence import Sequence, SequenceStatus
from ttedge.runtime.kv_cache import BLOCK_SIZE, BlockAllocator, OutOfBlocks, blocks_needed

# A sequence's expected response length in tokens, from what is known before its prefill.
LengthPredictFn = Callable[[Sequence], int]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    policy: str = "fcfs"  # one of policies.POLICY_NAMES
    # length-aware: the longest a request can be passed over in favour of shorter ones.
    max_wait_s: float = 30.0
    # length-aware: the response-length predictor's weights; None = the bundled SmolLM2-135M ones.
    length_predictor: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            names = ", ".join(POLICY_NAMES)
            raise ValueError(f"unknown scheduling policy {self.policy!r}; choose from {names}")


def load_length_predictor(path: str | None) -> LengthPredictFn:
    """The predictor in ``path`` (None: the bundled one) as the scheduler calls it."""
    predictor = LengthPredictor.load(Path(path) if path else DEFAULT_WEIGHTS)
    return lambda seq: predictor.predict([seq.prompt_ids])[0]


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """Whether the chunk reaches the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        predict_length: LengthPredictFn | None = None,
        policy: SchedulingPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``policy`` overrides the one named in ``config`` and ``predict_length`` the predictor it
        names (both for experiments: policy variants, exact lengths)."""
        self.config = config
        self.allocator = allocator
        self.policy = policy or make_policy(config.policy, config.max_wait_s)
        if predict_length is None and self.policy.needs_predictions:
            predict_length = load_length_predictor(config.length_predictor)
        self.predict_length = predict_length
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if self.policy.needs_predictions and self.predict_length and seq.predicted_output_len is None:
            seq.predicted_output_len = self.predict_length(seq)
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        now = self.clock()
        # In admission order, so that the policy's victims are taken before the sequences that
        # need the memory when the policy prefers the newest.
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for another sequence
                continue
            if budget == 0:
                break
            wanted = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + wanted, now):
                continue
            chunks.append(ScheduledChunk(seq, wanted))
            budget -= wanted
        # A policy may pick a victim that already has a chunk in this step (length-aware preempts the
        # longest remaining response, wherever it stands); its chunk goes with it.
        if any(c.seq.status is not SequenceStatus.RUNNING for c in chunks):
            chunks = [c for c in chunks if c.seq.status is SequenceStatus.RUNNING]
            budget = self.config.max_num_batched_tokens - sum(c.num_tokens for c in chunks)

        if not self.waiting or budget == 0 or len(self.running) >= self.config.max_num_seqs:
            return chunks
        for seq in self.policy.admission_order(self.waiting, now):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            wanted = min(seq.num_tokens - seq.num_computed, budget)
            try:
                self.allocator.grow_table(seq.block_table, self.policy.admission_tokens(seq, wanted))
            except OutOfBlocks:
                if self.policy.may_be_passed(seq, now):
                    continue
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, wanted))
            budget -= wanted
        return chunks

    def _reserve(self, seq: Sequence, num_tokens: int, now: float) -> bool:
        """Make ``seq``'s block table hold ``num_tokens``, taking reserved but unused blocks from other
        sequences first and preempting only when there are none. Returns False when ``seq`` itself
        had to be preempted."""
        while True:
            try:
                self.allocator.grow_table(seq.block_table, num_tokens)
                return True
            except OutOfBlocks:
                # A reservation is a plan, not a need: spending it now costs nothing, while a
                # preemption throws computed work away.
                donors = [s for s in self.running if s is not seq and _unused_blocks(s) > 0]
                if donors:
                    donor = self.policy.choose_victim(donors, now)
                    self.allocator.shrink_table(donor.block_table, (len(donor.block_table) - 1) * BLOCK_SIZE)
                    continue
                victim = self.policy.choose_victim(self.running, now)
                self._preempt(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def fits_ever(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens) <= self.allocator.num_blocks


def _unused_blocks(seq: Sequence) -> int:
    """Blocks held beyond every token the sequence has (its own step's chunk included)."""
    return len(seq.block_table) - blocks_needed(seq.num_tokens)
