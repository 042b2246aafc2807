"""Every big–little strategy through the real engine on a tiny float32 model, with a self-draft made of
the model's first layer as the small model: what each strategy must produce is known exactly (the big
model's greedy output, the small model's, or a splice of both), so the tests compare token for token."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts, tiny_small_model
from ttedge.collab.drafters import DraftRequest, PromptLookupDrafter
from ttedge.collab.strategies import CollabConfig, Route, Strategy
from ttedge.engine.engine import Engine, StrategyUnavailable
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.kernels import golden

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8] * 6, list(range(5, 55)), [9, 10, 11] * 5 + [12], list(range(30, 47)), [3]]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=3)


def make_engine(
    parts, strategy: Strategy, layers: list[int] | None = None, num_blocks: int = 64, **options
) -> Engine:
    collab = CollabConfig(tiny_small_model(parts, layers or [0]), default_strategy=strategy, **options)
    return tiny_engine(parts, num_blocks, scheduler_config=SchedulerConfig(max_num_seqs=8), collab=collab)


def outputs(engine: Engine, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [s.output_ids for s in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def big(parts) -> list[list[int]]:
    return outputs(tiny_engine(parts))


def small_continuations(parts, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    small = (parts[0].layer_subset([0]), parts[1])
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return outputs(tiny_engine(small), prompts, params)


@pytest.mark.parametrize("num_draft_tokens", [1, 4])
def test_speculative_with_the_small_model_equals_the_big_models_greedy_output(parts, big, num_draft_tokens):
    engine = make_engine(parts, Strategy.SPECULATIVE, num_draft_tokens=num_draft_tokens)
    assert outputs(engine) == big
    counters = engine.stats().collab
    assert 0 < counters.accepted_draft_tokens < counters.draft_tokens
    assert engine.runner.allocator.num_free == 64
    assert engine.collab is not None and engine.collab.small_model.num_cached_sequences == 0  # released


def test_a_draft_identical_to_the_big_model_is_always_accepted(parts, big):
    engine = make_engine(parts, Strategy.SPECULATIVE, layers=[0, 1], num_draft_tokens=4, adaptive=False)
    assert outputs(engine) == big
    counters = engine.stats().collab
    assert counters.accepted_draft_tokens == counters.draft_tokens > 0


def test_speculative_under_memory_pressure_equals_the_big_models_greedy_output(parts, big):
    engine = make_engine(parts, Strategy.SPECULATIVE, num_blocks=6)
    assert outputs(engine) == big
    assert engine.scheduler.num_preemptions > 0


def test_bild_with_a_zero_rollback_threshold_is_the_big_models_greedy_output(parts, big):
    # Every draft the big model gives less than probability 1 is rolled back: only its argmax survives.
    engine = make_engine(parts, Strategy.BILD, rollback_threshold=0.0, fallback_threshold=0.0)
    assert outputs(engine) == big
    assert engine.stats().collab.rollbacks > 0


def test_bild_keeps_plausible_drafts_the_big_model_would_not_have_picked(parts, big):
    engine = make_engine(
        parts, Strategy.BILD, rollback_threshold=50.0, fallback_threshold=0.0, num_draft_tokens=4
    )
    result = outputs(engine)
    counters = engine.stats().collab
    assert counters.rollbacks == 0 and counters.accepted_draft_tokens == counters.draft_tokens > 0
    assert result != big  # lossy: drafts were kept where the big model disagreed
    assert all(len(r) == GREEDY.max_tokens for r in result)


def test_bild_falls_back_to_the_big_model_when_the_small_one_is_unsure(parts, big):
    engine = make_engine(parts, Strategy.BILD, fallback_threshold=1.0, rollback_threshold=0.0)
    assert outputs(engine) == big
    counters = engine.stats().collab
    assert counters.draft_tokens == 0 and counters.fallbacks > 0


def test_guided_is_the_big_models_first_tokens_then_the_small_models_continuation(parts, big):
    engine = make_engine(parts, Strategy.GUIDED, guided_tokens=5)
    result = outputs(engine)
    heads = [b[:5] for b in big]
    expected = [
        h + tail
        for h, tail in zip(
            heads,
            small_continuations(parts, [p + h for p, h in zip(PROMPTS, heads, strict=True)], 35),
            strict=True,
        )
    ]
    assert result == expected
    assert engine.stats().collab.small_model_tokens == len(PROMPTS) * 35
    assert engine.runner.allocator.num_free == 64


def test_routing_sends_confident_requests_to_the_small_model_and_reports_it(parts, big):
    small = small_continuations(parts, PROMPTS, GREEDY.max_tokens)
    everyone_small = make_engine(parts, Strategy.ROUTED, route_threshold=0.0)
    seqs = everyone_small.generate(PROMPTS, GREEDY)
    assert [s.output_ids for s in seqs] == small
    assert all(s.route is Route.SMALL for s in seqs)
    nobody_small = make_engine(parts, Strategy.ROUTED, route_threshold=1.01)
    assert outputs(nobody_small) == big
    assert nobody_small.stats().collab.routed_big == len(PROMPTS)
    # A threshold amid the probes' mean confidences splits the requests.
    probes = tiny_small_model(parts, [0]).propose([DraftRequest(str(i), p, 8) for i, p in enumerate(PROMPTS)])
    means = sorted(sum(p.confidences) / len(p.confidences) for p in probes)
    split = make_engine(parts, Strategy.ROUTED, route_threshold=means[2], route_probe_tokens=8)
    seqs = split.generate(PROMPTS, GREEDY)
    assert {s.route for s in seqs} == {Route.SMALL, Route.BIG}
    for seq, from_big, from_small in zip(seqs, big, small, strict=True):
        assert seq.output_ids == (from_small if seq.route is Route.SMALL else from_big)


def test_a_small_model_out_of_memory_hands_its_sequences_back_to_the_big_model(parts):
    collab = CollabConfig(
        tiny_small_model(parts, [0], num_blocks=2), default_strategy=Strategy.GUIDED, guided_tokens=2
    )
    engine = tiny_engine(parts, 64, collab=collab)
    seqs = engine.generate(PROMPTS[:3], GREEDY)
    assert all(len(s.output_ids) == GREEDY.max_tokens for s in seqs)
    assert engine.stats().collab.small_model_tokens < 3 * (GREEDY.max_tokens - 2)


def test_requests_pick_their_strategy_and_unavailable_ones_are_refused(parts, big):
    engine = make_engine(parts, Strategy.PLAIN)
    plain = engine.add_request(PROMPTS[0], GREEDY)
    guided = engine.add_request(PROMPTS[1], GREEDY, strategy=Strategy.GUIDED)
    for _ in engine.stream():
        pass
    assert plain.output_ids == big[0] and guided.output_ids != big[1]
    lookup = tiny_engine(parts, collab=CollabConfig(PromptLookupDrafter()))
    with pytest.raises(StrategyUnavailable, match="needs a small model"):
        lookup.add_request(PROMPTS[0], GREEDY, strategy=Strategy.BILD)
    with pytest.raises(StrategyUnavailable, match="needs a drafter"):
        tiny_engine(parts).add_request(PROMPTS[0], GREEDY, strategy=Strategy.SPECULATIVE)
    with pytest.raises(ValueError, match="needs a small model"):
        CollabConfig(PromptLookupDrafter(), default_strategy=Strategy.ROUTED)


def test_drafts_never_push_a_decode_step_past_the_backends_cheap_rows(parts, big):
    engine = make_engine(parts, Strategy.SPECULATIVE, layers=[0, 1], num_draft_tokens=4, adaptive=False)
    engine.runner.cheap_rows = 6
    widths: list[int] = []
    run = engine.runner.run

    def recording_run(inputs):
        widths.append(sum(len(i.token_ids) for i in inputs))
        return run(inputs)

    engine.runner.run = recording_run  # type: ignore[method-assign]
    assert outputs(engine, PROMPTS[:3]) == big[:3]
    decode_widths = [w for w in widths if w < 16]  # the prompts' prefill is wider anyway
    assert max(decode_widths) == 6  # three decoding sequences, three drafts between them
    assert engine.stats().collab.draft_tokens > 0


class GreedyIdsRunner:
    """The tiny CPU runner plus ``run_greedy``, as the TT runner picks argmaxes on the card; records which
    of the two each step used."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []
        self.config, self.allocator, self.max_model_len = (
            runner.config,
            runner.allocator,
            runner.max_model_len,
        )
        self.cheap_rows = runner.cheap_rows

    def run(self, inputs):
        self.calls.append("logits")
        return self.runner.run(inputs)

    def run_greedy(self, inputs):
        self.calls.append("ids")
        return [rows.argmax(dim=-1) for rows in self.runner.run(inputs)]


class VerifyingRunner(GreedyIdsRunner):
    """``GreedyIdsRunner`` plus ``run_greedy_verify``, as the TT runner verifies greedy drafts on the card:
    the accepted lengths come from the acceptance kernel's golden (a vectorised prefix scan, not the
    engine's ``accept_greedy``), and only a count and a token per input go back."""

    def run_greedy_verify(self, inputs, drafts):
        self.calls.append("verify")
        verdicts = []
        for rows, draft in zip(self.runner.run(inputs), drafts, strict=True):
            targets = rows[rows.shape[0] - len(draft) - 1 :].argmax(dim=-1)
            accepted = int(golden.accepted_lengths(torch.tensor([draft]), targets[None])[0])
            verdicts.append((accepted, int(targets[accepted])))
        return verdicts


@pytest.mark.parametrize("strategy", [Strategy.PLAIN, Strategy.SPECULATIVE])
def test_drafts_verified_by_the_runner_give_the_same_output(parts, big, strategy):
    # A one-layer draft model: drafts accepted and rejected.
    on_host = make_engine(parts, strategy)
    on_host.runner = GreedyIdsRunner(on_host.runner)
    on_device = make_engine(parts, strategy)
    on_device.runner = VerifyingRunner(on_device.runner)
    assert outputs(on_device) == outputs(on_host) == big
    assert set(on_device.runner.calls) == {"verify"}
    assert on_device.stats().collab == on_host.stats().collab
    if strategy is Strategy.SPECULATIVE:
        assert 0 < on_device.stats().collab.accepted_draft_tokens < on_device.stats().collab.draft_tokens


@pytest.mark.parametrize("strategy", [Strategy.PLAIN, Strategy.SPECULATIVE])
def test_token_ids_picked_by_the_runner_give_the_same_output(parts, big, strategy):
    engine = make_engine(parts, strategy, layers=[0, 1])
    engine.runner = GreedyIdsRunner(engine.runner)
    assert outputs(engine) == big
    assert set(engine.runner.calls) == {"ids"}
    if strategy is Strategy.SPECULATIVE:
        assert engine.stats().collab.accepted_draft_tokens > 0


def test_logits_come_back_while_a_step_needs_them(parts):
    engine = make_engine(parts, Strategy.PLAIN)
    engine.runner = GreedyIdsRunner(engine.runner)
    engine.add_request(PROMPTS[0], GREEDY)
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2, ignore_eos=True))
    engine.add_request(
        PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), strategy=Strategy.BILD
    )
    for _ in engine.stream():
        pass
    calls = engine.runner.calls
    # Logits while the logprobs request and the BiLD one run (prefill and at least 7 decode steps), then
    # token ids alone for the greedy request left.
    first_ids = calls.index("ids")
    assert first_ids >= 8 and set(calls[first_ids:]) == {"ids"}
