"""The step loop on a tiny random model: batching, chunked prefill, preemption, stops, aborts.

Greedy decoding is deterministic, so every scheduling variant must yield exactly the tokens of the
plain run; what differs is only when each sequence's work happens.
"""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts
from ttedge.engine.engine import Engine, RequestRejected
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.engine.sequence import FinishReason

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=3)


def make_engine(parts, num_blocks: int = 64, **scheduler) -> Engine:
    return tiny_engine(parts, num_blocks, scheduler_config=SchedulerConfig(**scheduler))


PROMPTS = [list(range(5, 5 + n)) for n in (3, 50, 17, 90, 1)]


@pytest.fixture(scope="module")
def alone(parts) -> list[list[int]]:
    """Each prompt run by itself: the ground truth every schedule must reproduce."""
    return [make_engine(parts).generate([p], GREEDY)[0].output_ids for p in PROMPTS]


def test_continuous_batch_reproduces_each_sequence_alone(parts, alone):
    seqs = make_engine(parts).generate(PROMPTS, GREEDY)
    assert [s.output_ids for s in seqs] == alone


def test_chunked_prefill_interleaves_with_decodes_and_changes_nothing(parts, alone):
    engine = make_engine(parts, max_num_batched_tokens=16)
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    saw_mixed_step = False
    while engine.has_unfinished():
        chunks = engine.scheduler.schedule()
        decoding = [c for c in chunks if c.num_tokens == 1 and c.seq.output_ids]
        prefilling = [c for c in chunks if not c.seq.output_ids and not c.completes_sequence]
        saw_mixed_step |= bool(decoding and prefilling)
        assert sum(c.num_tokens for c in chunks) <= 16
        engine.execute(chunks)
    assert saw_mixed_step
    assert [s.output_ids for s in seqs] == alone


def test_preemption_when_blocks_run_out_recomputes_and_loses_nothing(parts, alone):
    # 8 blocks of 32 tokens cannot hold all five sequences at full length (up to 130 tokens each).
    engine = make_engine(parts, num_blocks=8)
    seqs = engine.generate(PROMPTS, GREEDY)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_ids for s in seqs] == alone
    assert engine.runner.allocator.num_free == 8


def test_stop_string_cuts_the_text_and_ends_the_sequence(parts, alone):
    _, tokenizer = parts
    full_text = tokenizer.decode(alone[1])
    stop = full_text[10:13]
    engine = make_engine(parts)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=(stop,))
    seq = engine.add_request(PROMPTS[1], params)
    streamed = "".join(out.new_text for out in engine.stream())
    assert seq.finish_reason is FinishReason.STOP
    assert streamed == seq.text == full_text[: full_text.find(stop)]


def test_stop_token_and_max_tokens_finish_with_their_reasons(parts, alone):
    engine = make_engine(parts)
    stop_token = alone[0][5]
    by_token = engine.add_request(
        PROMPTS[0],
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=(stop_token,)),
    )
    by_length = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    list(engine.stream())
    assert by_token.finish_reason is FinishReason.STOP
    assert by_token.output_ids == alone[0][: alone[0].index(stop_token) + 1]
    assert by_length.finish_reason is FinishReason.LENGTH and len(by_length.output_ids) == 7


def test_abort_frees_blocks_at_once(parts):
    engine = make_engine(parts, num_blocks=16)
    seq = engine.add_request(PROMPTS[3], GREEDY)
    engine.step()
    assert engine.runner.allocator.num_free < 16
    engine.abort(seq.request_id)
    assert engine.runner.allocator.num_free == 16
    assert seq.finish_reason is FinishReason.ABORT and not engine.has_unfinished()


def test_requests_that_can_never_fit_are_refused(parts):
    engine = make_engine(parts, num_blocks=2)
    with pytest.raises(RequestRejected, match="exceed the whole KV cache"):
        engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=20))
    with pytest.raises(RequestRejected, match="context holds 256"):
        engine.add_request([3] * 300, SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestRejected, match=r"\[0, 256\)"):
        engine.add_request([999], SamplingParams())


def test_seeded_sampling_is_reproducible_across_batch_company(parts):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    lone = make_engine(parts).generate([PROMPTS[2]], params)[0].output_ids
    engine = make_engine(parts)
    seq = engine.add_request(PROMPTS[2], params)
    engine.add_request(PROMPTS[3], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True))
    list(engine.stream())
    assert seq.output_ids == lone
