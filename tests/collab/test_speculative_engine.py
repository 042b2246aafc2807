"""Speculative decoding through the real engine on a tiny float32 model: greedy output equals plain
greedy decoding token for token, alone and in a mixed continuous batch, under memory pressure, and at
every limit a multi-token step can overshoot."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts
from ttedge.collab.drafters import PromptLookupDrafter
from ttedge.collab.strategies import CollabConfig
from ttedge.engine.engine import Engine
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import SchedulerConfig

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
# Repetitive prompts give prompt lookup something to find; the others mostly get no drafts.
PROMPTS = [[5, 6, 7, 8] * 6, list(range(5, 55)), [9, 10, 11] * 5 + [12], list(range(30, 47)), [3]]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=3)


def make_engine(
    parts, speculative: bool, num_blocks: int = 64, num_draft_tokens: int = 4, adaptive: bool = True
) -> Engine:
    config = (
        CollabConfig(PromptLookupDrafter(), num_draft_tokens=num_draft_tokens, adaptive=adaptive)
        if speculative
        else None
    )
    return tiny_engine(parts, num_blocks, scheduler_config=SchedulerConfig(max_num_seqs=8), collab=config)


@pytest.fixture(scope="module")
def plain(parts) -> list[list[int]]:
    return [s.output_ids for s in make_engine(parts, speculative=False).generate(PROMPTS, GREEDY)]


def test_each_sequence_alone_equals_plain_greedy(parts, plain):
    for prompt, expected in zip(PROMPTS, plain, strict=True):
        engine = make_engine(parts, speculative=True)
        assert engine.generate([prompt], GREEDY)[0].output_ids == expected


@pytest.mark.parametrize("num_draft_tokens", [1, 4, 8])
def test_mixed_batch_equals_plain_greedy_and_drafts_are_accepted(parts, plain, num_draft_tokens):
    engine = make_engine(parts, speculative=True, num_draft_tokens=num_draft_tokens)
    steps = 0
    seqs = [engine.add_request(p, GREEDY) for p in PROMPTS]
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert [s.output_ids for s in seqs] == plain
    stats = engine.stats().collab
    # The comparison means something only if drafts were verified and some were accepted.
    assert stats.accepted_draft_tokens > 0 and stats.draft_tokens >= stats.accepted_draft_tokens
    assert steps < GREEDY.max_tokens  # plain decoding needs a step per token
    assert engine.runner.allocator.num_free == 64


def test_memory_pressure_preempts_and_still_equals_plain(parts, plain):
    engine = make_engine(parts, speculative=True, num_blocks=6)
    seqs = engine.generate(PROMPTS, GREEDY)
    assert [s.output_ids for s in seqs] == plain
    assert sum(s.num_preemptions for s in seqs) > 0
    assert engine.runner.allocator.num_free == 6


def test_multi_token_steps_stop_exactly_at_the_limits(parts):
    engine = make_engine(parts, speculative=True, num_draft_tokens=8)
    prompt = [5, 6, 7, 8] * 6
    reference = make_engine(parts, speculative=False).generate([prompt], GREEDY)[0].output_ids
    for max_tokens in (1, 2, 7, 13):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
        seq = engine.generate([prompt], params)[0]
        assert seq.output_ids == reference[:max_tokens]
        assert len(seq.output_logprobs) == max_tokens and all(lp is not None for lp in seq.output_logprobs)
    # A stop token inside an accepted run of drafts ends the sequence there.
    stop = reference[5]
    first = reference.index(stop)
    seq = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=(stop,)))[0]
    assert seq.output_ids == reference[: first + 1]
    assert engine.runner.allocator.num_free == 64


def test_sampled_requests_are_reproducible_with_a_seed(parts):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    engine = make_engine(parts, speculative=True)
    first = engine.generate(PROMPTS[:2], params)
    again = make_engine(parts, speculative=True).generate(PROMPTS[:2], params)
    # Same seed, same engine configuration: the same draws, so the same text.
    assert [s.output_ids for s in first] == [s.output_ids for s in again]
    assert all(len(s.output_ids) == 30 for s in first)


def test_adaptive_budget_verifies_fewer_rejected_drafts_for_the_same_output(parts, plain):
    fixed = make_engine(parts, speculative=True, num_draft_tokens=8, adaptive=False)
    adaptive = make_engine(parts, speculative=True, num_draft_tokens=8)
    assert [s.output_ids for s in fixed.generate(PROMPTS, GREEDY)] == plain
    assert [s.output_ids for s in adaptive.generate(PROMPTS, GREEDY)] == plain
    stats = {e: e.stats().collab for e in (fixed, adaptive)}
    rejected = {e: s.draft_tokens - s.accepted_draft_tokens for e, s in stats.items()}
    rate = {e: s.accepted_draft_tokens / s.draft_tokens for e, s in stats.items()}
    assert rejected[adaptive] < rejected[fixed]
    assert rate[adaptive] > rate[fixed]


def test_cli_refuses_a_draft_count_below_one_in_one_line(capsys):
    from ttedge.cli import main

    argv = ["generate", "--prompt", "x", "--draft", "prompt-lookup", "--num-draft-tokens", "0"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "ttedge: error: collaboration: num_draft_tokens must be at least 1, got 0"
    )
