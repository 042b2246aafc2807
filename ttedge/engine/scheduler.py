"""Who runs in the next step: admission, chunked prefill, and preemption when KV blocks run out.

Each step has a token budget. Running sequences that are decoding go first (one token each), so a
long prompt never stalls users who are already streaming; prompts are then prefilled in chunks
with what remains of the budget. When a running sequence needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed later. Nothing is ever dropped for lack of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ttedge.engine.sequence import Sequence, SequenceStatus
from ttedge.runtime.kv_cache import BlockAllocator, OutOfBlocks, blocks_needed


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """Whether the chunk reaches the sequence's last known token, so a new one is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
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
        # Oldest first, so that preemption (which takes from the end) hits the newest arrivals.
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an older sequence
                continue
            if budget == 0:
                break
            wanted = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, seq.num_computed + wanted):
                continue
            chunks.append(ScheduledChunk(seq, wanted))
            budget -= wanted

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            wanted = min(seq.num_tokens - seq.num_computed, budget)
            try:
                self.allocator.grow_table(seq.block_table, seq.num_computed + wanted)
            except OutOfBlocks:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, wanted))
            budget -= wanted
        return chunks

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq``'s block table hold ``num_tokens``, preempting newer sequences if needed.
        Returns False when ``seq`` itself had to be preempted."""
        while True:
            try:
                self.allocator.grow_table(seq.block_table, num_tokens)
                return True
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def fits_ever(self, num_tokens: int) -> bool:
        return blocks_needed(num_tokens) <= self.allocator.num_blocks
