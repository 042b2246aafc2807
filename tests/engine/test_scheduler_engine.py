"""Both scheduling policies through the real engine on a tiny float32 model: scheduling decides only
when work happens, never which tokens come out, with and without memory pressure."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts
from ttedge.engine.length_predictor import LengthPredictor
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.engine.sequence import Sequence

PROMPTS = [list(range(5, 5 + n)) for n in (3, 50, 17, 90, 1, 33)]
MAX_TOKENS = [40, 5, 30, 12, 40, 2]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory, parts):
    """A predictor for the tiny model's 256-token vocabulary, through its file format."""
    rng = np.random.default_rng(0)
    predictor = LengthPredictor(rng.normal(size=256).astype(np.float32) * 2, float(np.log(15)), max_tokens=64)
    path = tmp_path_factory.mktemp("predictor") / "tiny.npz"
    predictor.save(path)
    return str(path)


def run(parts, num_blocks: int, **scheduler) -> tuple[list[Sequence], list[str]]:
    engine = tiny_engine(parts, num_blocks, scheduler_config=SchedulerConfig(max_num_seqs=3, **scheduler))
    seqs = [
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)
    ]
    admitted: list[str] = []
    while engine.has_unfinished():
        chunks = engine.scheduler.schedule()
        admitted += [c.seq.request_id for c in chunks if c.seq.request_id not in admitted]
        engine.execute(chunks)
    assert engine.runner.allocator.num_free == num_blocks
    return seqs, admitted


@pytest.mark.parametrize("num_blocks", [64, 5])
def test_greedy_outputs_are_the_same_under_both_policies(parts, predictor_path, num_blocks):
    fcfs, fcfs_order = run(parts, num_blocks, policy="fcfs")
    aware, aware_order = run(parts, num_blocks, policy="length-aware", length_predictor=predictor_path)
    assert [s.output_ids for s in aware] == [s.output_ids for s in fcfs]
    assert [len(s.output_ids) for s in aware] == MAX_TOKENS
    # The comparison means something only if the schedules really differed.
    assert aware_order != fcfs_order
    assert all(s.predicted_output_len is not None for s in aware)
    assert all(s.predicted_output_len is None for s in fcfs)
    if num_blocks == 5:
        assert sum(s.num_preemptions for s in fcfs) > 0
