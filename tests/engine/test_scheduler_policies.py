"""Scheduling policies on the scheduler alone: admission order, aging, KV reservation, preemption choice.

A small driver stands in for the engine: every scheduled chunk is computed at once and a completed
sequence gets one more token, until it reaches the response length the test gave it. A fake clock
makes waiting times exact.
"""

from __future__ import annotations

import pytest

from ttedge.engine.policies import LengthAwarePolicy, expected_output_len, make_policy
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import Scheduler, SchedulerConfig
from ttedge.engine.sequence import Sequence, SequenceStatus
from ttedge.runtime.kv_cache import BLOCK_SIZE, BlockAllocator


class NullStream:
    def add(self, token_id: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def preset(seq: Sequence) -> int:
    """The predictor for tests that set every prediction themselves."""
    raise AssertionError(f"{seq.request_id} should carry its prediction already")


def make_seq(name: str, arrival: float, prompt_len: int = 8, predicted: int | None = None, max_tokens=256):
    seq = Sequence(name, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), NullStream(), arrival)
    seq.predicted_output_len = predicted
    return seq


def step(scheduler: Scheduler, true_lengths: dict[str, int]) -> list[Sequence]:
    """Schedule and 'run' one step; returns the sequences that finished."""
    finished = []
    for chunk in scheduler.schedule():
        seq = chunk.seq
        completes = chunk.completes_sequence
        seq.num_computed += chunk.num_tokens
        if completes:
            seq.output_ids.append(7)
            if len(seq.output_ids) >= true_lengths[seq.request_id]:
                scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
                finished.append(seq)
    return finished


def admitted_order(policy: str, seqs: list[Sequence], now: float = 0.0) -> list[str]:
    clock = Clock()
    clock.now = now
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=len(seqs), policy=policy),
        BlockAllocator(1000),
        predict_length=preset,
        clock=clock,
    )
    for seq in seqs:
        scheduler.add(seq)
    return [c.seq.request_id for c in scheduler.schedule()]


def test_policies_are_chosen_by_name_and_unknown_names_are_refused():
    assert make_policy("fcfs", 10.0).name == "fcfs"
    assert make_policy("length-aware", 10.0).name == "length-aware"
    with pytest.raises(ValueError, match="unknown scheduling policy 'sjf'"):
        SchedulerConfig(policy="sjf")


def test_fcfs_admits_in_arrival_order_and_length_aware_shortest_predicted_first():
    def seqs() -> list[Sequence]:
        return [
            make_seq("long", 0.0, predicted=200),
            make_seq("short", 1.0, predicted=5),
            make_seq("medium", 2.0, predicted=60),
        ]

    assert admitted_order("fcfs", seqs(), now=3.0) == ["long", "short", "medium"]
    assert admitted_order("length-aware", seqs(), now=3.0) == ["short", "medium", "long"]


def test_aging_lets_a_long_wait_overtake_a_shorter_prediction():
    # max_wait 30 s: after 27 s a 200-token request scores 200 * 0.1 = 20, below a fresh 30-token one.
    old = make_seq("old-long", 0.0, predicted=200)
    fresh = make_seq("fresh-short", 27.0, predicted=30)
    assert admitted_order("length-aware", [fresh, old], now=27.0) == ["old-long", "fresh-short"]
    # ...but not after 20 s (score 200 / 3 = 67 > 30).
    old = make_seq("old-long", 0.0, predicted=200)
    fresh = make_seq("fresh-short", 20.0, predicted=30)
    assert admitted_order("length-aware", [fresh, old], now=20.0) == ["fresh-short", "old-long"]


def run_stream_of_short_requests(max_wait_s: float, steps: int) -> int | None:
    """One long request, then a new short request every second, one sequence at a time: the step at
    which the long one is admitted, or None if it never is within ``steps``."""
    clock = Clock()
    policy = LengthAwarePolicy(max_wait_s)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=1), BlockAllocator(1000), preset, policy=policy, clock=clock
    )
    lengths = {"long": 10_000}
    scheduler.add(make_seq("long", 0.0, predicted=250))
    for t in range(steps):
        clock.now = float(t)
        name = f"short-{t}"
        lengths[name] = 1
        scheduler.add(make_seq(name, clock.now, predicted=3))
        step(scheduler, lengths)
        if any(s.request_id == "long" for s in scheduler.running):
            return t
    return None


def test_a_long_request_is_never_starved_past_the_wait_bound():
    admitted_at = run_stream_of_short_requests(max_wait_s=10.0, steps=100)
    assert admitted_at is not None and admitted_at <= 10 + 1
    # Without a bound worth the name, the stream of short requests would starve it.
    assert run_stream_of_short_requests(max_wait_s=1e9, steps=100) is None


def test_a_request_that_does_not_fit_yet_is_passed_only_until_it_is_overdue():
    def admitted(policy: str, now: float) -> list[str]:
        clock = Clock()
        allocator = BlockAllocator(10)
        scheduler = Scheduler(SchedulerConfig(policy=policy, max_wait_s=10.0), allocator, preset, clock=clock)
        scheduler.add(make_seq("holder", 0.0, prompt_len=100, predicted=100))  # takes 7 of 10 blocks
        clock.now = 0.0
        scheduler.schedule()
        scheduler.add(make_seq("big", 1.0, prompt_len=150, predicted=20))  # needs 6
        scheduler.add(make_seq("small", 2.0, prompt_len=10, predicted=50))  # needs 2
        clock.now = now
        return [c.seq.request_id for c in scheduler.schedule() if c.seq.request_id != "holder"]

    assert admitted("length-aware", now=5.0) == ["small"]
    assert admitted("length-aware", now=11.0) == []  # "big" is overdue: nothing passes it any more
    assert admitted("fcfs", now=5.0) == ["big", "small"]  # FCFS takes only what prompts need now


def test_length_aware_reserves_blocks_for_the_predicted_response():
    allocator = BlockAllocator(100)
    scheduler = Scheduler(SchedulerConfig(policy="length-aware"), allocator, preset, clock=Clock())
    seq = make_seq("a", 0.0, prompt_len=10, predicted=100)
    scheduler.add(seq)
    scheduler.schedule()
    assert len(seq.block_table) == -(-(10 + 100) // BLOCK_SIZE)  # 4 blocks, not the 1 the prompt needs
    # Within its prediction it never asks for another block.
    lengths = {"a": 100}
    while step(scheduler, lengths) == []:
        assert len(seq.block_table) == 4
    assert allocator.num_free == 100


def test_fcfs_takes_only_what_the_prompt_needs():
    scheduler = Scheduler(SchedulerConfig(policy="fcfs"), BlockAllocator(100), preset, clock=Clock())
    seq = make_seq("a", 0.0, prompt_len=10, predicted=100)
    scheduler.add(seq)
    scheduler.schedule()
    assert len(seq.block_table) == 1


def test_reservation_holds_back_admissions_that_would_later_force_preemption():
    # 8 blocks; each request: 8-token prompt, 100-token response (4 blocks at full length).
    def run(policy: str) -> tuple[int, int]:
        scheduler = Scheduler(SchedulerConfig(policy=policy), BlockAllocator(8), preset, clock=Clock())
        lengths = {}
        for i in range(4):
            scheduler.add(make_seq(f"r{i}", float(i), predicted=100))
            lengths[f"r{i}"] = 100
        first_step_admitted = len(scheduler.schedule())
        for seq in scheduler.running:  # finish the first step by hand
            seq.num_computed = seq.num_tokens
            seq.output_ids.append(7)
        while scheduler.num_unfinished:
            step(scheduler, lengths)
        return first_step_admitted, scheduler.num_preemptions

    admitted, preemptions = run("fcfs")
    assert admitted == 4 and preemptions > 0
    assert run("length-aware") == (2, 0)


def test_a_prediction_that_was_too_short_grows_block_by_block():
    scheduler = Scheduler(SchedulerConfig(policy="length-aware"), BlockAllocator(100), preset, clock=Clock())
    seq = make_seq("a", 0.0, prompt_len=10, predicted=20)
    scheduler.add(seq)
    lengths = {"a": 150}
    tables = set()
    while not step(scheduler, lengths):
        tables.add(len(seq.block_table))
    assert tables == {1, 2, 3, 4, 5}
    # Past the prediction the plan becomes twice what it has produced.
    seq.output_ids = [7] * 30
    assert expected_output_len(seq) == 60


def test_outgrowing_a_prediction_spends_unused_reservations_before_preempting():
    allocator = BlockAllocator(10)
    scheduler = Scheduler(SchedulerConfig(policy="length-aware"), allocator, preset, clock=Clock())
    long = make_seq("long", 0.0, prompt_len=10, predicted=200)  # reserves 7 blocks
    under = make_seq("under", 1.0, prompt_len=10, predicted=2)  # reserves 1, will need 4
    medium = make_seq("medium", 2.0, prompt_len=2, predicted=50)  # reserves 2, needs 1 for a while
    for seq in (long, under, medium):
        scheduler.add(seq)
    lengths = {"long": 1000, "under": 100, "medium": 50}
    step(scheduler, lengths)
    assert allocator.num_free == 0 and len(scheduler.running) == 3
    while len(under.block_table) == 1:
        step(scheduler, lengths)
    # Both others had a spare block; the one with the longest predicted remaining response gave it.
    assert len(long.block_table) == 6 and len(medium.block_table) == 2
    while under not in step(scheduler, lengths):
        pass
    assert scheduler.num_preemptions == 0


def test_length_aware_preempts_the_longest_predicted_remaining_not_the_newest():
    clock = Clock()
    allocator = BlockAllocator(6)
    scheduler = Scheduler(
        SchedulerConfig(policy="length-aware", max_wait_s=100.0), allocator, preset, clock=clock
    )
    # Predictions too short on purpose, so that both have to grow into the last free blocks.
    old_long = make_seq("old-long", 0.0, prompt_len=30, predicted=2)  # will be predicted long later
    new_short = make_seq("new-short", 1.0, prompt_len=30, predicted=2)
    scheduler.add(old_long)
    scheduler.add(new_short)
    clock.now = 1.0
    lengths = {"old-long": 1000, "new-short": 1000}
    step(scheduler, lengths)
    assert scheduler.running == [old_long, new_short]
    old_long.predicted_output_len = 500
    new_short.predicted_output_len = 40
    while not scheduler.num_preemptions:
        step(scheduler, lengths)
    assert old_long.num_preemptions == 1 and new_short.num_preemptions == 0
    assert scheduler.running == [new_short]


def test_a_victim_scheduled_earlier_in_the_step_loses_its_chunk():
    """The victim (longest predicted remaining) comes first in running order, so its chunk was already
    planned when the later sequence needed its memory: the step must not run it on freed blocks."""
    clock = Clock()
    scheduler = Scheduler(
        SchedulerConfig(policy="length-aware", max_wait_s=100.0), BlockAllocator(6), preset, clock=clock
    )
    old_long = make_seq("old-long", 0.0, prompt_len=30, predicted=2)
    # One token longer, so it crosses each block boundary a step before the victim does.
    new_short = make_seq("new-short", 1.0, prompt_len=31, predicted=2)
    scheduler.add(old_long)
    scheduler.add(new_short)
    clock.now = 1.0
    step(scheduler, {"old-long": 1000, "new-short": 1000})
    old_long.predicted_output_len, new_short.predicted_output_len = 500, 40
    while not scheduler.num_preemptions:
        chunks = scheduler.schedule()
        for chunk in chunks:
            seq = chunk.seq
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) * BLOCK_SIZE >= seq.num_computed + chunk.num_tokens
            seq.num_computed += chunk.num_tokens
            if chunk.completes_sequence:
                seq.output_ids.append(7)
    assert old_long.num_preemptions == 1 and old_long.num_computed == 0


def test_fcfs_preempts_the_newest():
    allocator = BlockAllocator(6)
    scheduler = Scheduler(SchedulerConfig(policy="fcfs"), allocator, preset, clock=Clock())
    old_long = make_seq("old-long", 0.0, prompt_len=30, predicted=500)
    new_short = make_seq("new-short", 1.0, prompt_len=30, predicted=40)
    scheduler.add(old_long)
    scheduler.add(new_short)
    lengths = {"old-long": 1000, "new-short": 1000}
    while not scheduler.num_preemptions:
        step(scheduler, lengths)
    assert new_short.num_preemptions == 1 and old_long.num_preemptions == 0


def test_overdue_sequences_are_preempted_last():
    clock = Clock()
    policy = LengthAwarePolicy(max_wait_s=10.0)
    running = [make_seq("overdue-long", 0.0, predicted=500), make_seq("fresh-short", 15.0, predicted=40)]
    clock.now = 16.0
    assert policy.choose_victim(running, clock.now).request_id == "fresh-short"
    # Among overdue sequences the newest goes, as under FCFS.
    running.append(make_seq("overdue-newer", 2.0, predicted=900))
    assert policy.choose_victim(running[:1] + running[2:], clock.now).request_id == "overdue-newer"


def test_length_aware_predicts_each_request_once_on_arrival_and_fcfs_never():
    calls: list[str] = []

    def predict(seq: Sequence) -> int:
        calls.append(seq.request_id)
        return len(calls) * 10

    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=1, policy="length-aware"), BlockAllocator(100), predict_length=predict
    )
    for i in range(3):
        scheduler.add(make_seq(f"r{i}", float(i)))
    assert [s.predicted_output_len for s in scheduler.waiting] == [10, 20, 30]
    for _ in range(3):
        scheduler.schedule()
    assert calls == ["r0", "r1", "r2"]
    scheduler = Scheduler(SchedulerConfig(policy="fcfs"), BlockAllocator(100), predict_length=predict)
    scheduler.add(make_seq("x", 0.0))
    assert calls == ["r0", "r1", "r2"] and scheduler.waiting[0].predicted_output_len is None
