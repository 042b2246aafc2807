"""What the engine offers a server: a bounded queue, a snapshot of its state, its longest sequence."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts
from ttedge.engine.engine import Engine, EngineStats, QueueFull
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import SchedulerConfig

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=5)


def make_engine(parts, num_blocks: int, **kwargs) -> Engine:
    return tiny_engine(parts, num_blocks, **kwargs)


def test_queue_limit_counts_running_and_waiting_requests(parts):
    engine = make_engine(parts, 64, scheduler_config=SchedulerConfig(max_num_seqs=2), max_queue_len=1)
    for _ in range(3):
        engine.add_request([5, 6, 7], PARAMS)
    with pytest.raises(
        QueueFull, match=r"3 requests are in flight, the limit is 3 \(2 running \+ 1 queued\)"
    ):
        engine.add_request([5, 6, 7], PARAMS)
    engine.step()  # two run, one waits: still full
    with pytest.raises(QueueFull):
        engine.add_request([5], PARAMS)
    list(engine.stream())
    engine.add_request([5], PARAMS)


def test_stats_snapshot_the_queue_the_batch_and_the_kv_blocks(parts):
    engine = make_engine(parts, 16, scheduler_config=SchedulerConfig(max_num_seqs=1))
    assert engine.stats() == EngineStats(num_waiting=0, num_running=0, kv_blocks_used=0, kv_blocks_total=16)
    engine.add_request(list(range(3, 40)), PARAMS)
    engine.add_request([4], PARAMS)
    engine.step()
    assert engine.stats() == EngineStats(num_waiting=1, num_running=1, kv_blocks_used=2, kv_blocks_total=16)


def test_max_sequence_len_is_the_context_or_the_whole_kv_cache(parts):
    assert make_engine(parts, 64).max_sequence_len == 256
    assert make_engine(parts, 5).max_sequence_len == 5 * 32
