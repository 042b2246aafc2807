import math

import pytest
import torch

from ttedge.engine.sampling import Sampler, SamplingError, SamplingParams


def test_greedy_rows_take_argmax_and_mixed_rows_respect_their_own_params():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=1, seed=3)]
    result = Sampler().sample(logits, params, [None, torch.Generator().manual_seed(3)])
    assert result.token_ids == [1, 0]
    assert result.logprobs == [None, None]


def test_top_k_never_samples_outside_the_k_most_likely():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=5.0, top_k=2)]
    seen = {Sampler().sample(logits, params, [gen]).token_ids[0] for _ in range(300)}
    assert seen == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_p=0.75)]
    seen = {Sampler().sample(probs.log(), params, [gen]).token_ids[0] for _ in range(400)}
    # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the first two survive, the rest never appear.
    assert seen == {0, 1}


def test_extreme_temperature_and_top_p_still_pick_the_most_likely_token():
    # 5e-324 is a valid float64 but 0 in float32: it must neither divide by zero nor drop every token.
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    for params in (SamplingParams(temperature=5e-324), SamplingParams(top_p=5e-324)):
        result = Sampler().sample(logits, [params], [torch.Generator().manual_seed(0)])
        assert result.token_ids == [0]


def test_sampling_frequencies_follow_the_temperature_scaled_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    temperature = 2.0
    expected = torch.softmax(logits[0] / temperature, dim=0)
    gen = torch.Generator().manual_seed(1234)
    params = [SamplingParams(temperature=temperature)]
    draws = 6000
    counts = torch.zeros(3)
    for _ in range(draws):
        counts[Sampler().sample(logits, params, [gen]).token_ids[0]] += 1
    # Three binomial standard deviations on each bucket.
    for observed, p in zip(counts / draws, expected, strict=True):
        assert abs(float(observed) - float(p)) < 3 * math.sqrt(float(p * (1 - p)) / draws)


def test_same_seed_reproduces_the_same_tokens():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.0, seed=7)]

    def run() -> list[int]:
        gen = torch.Generator().manual_seed(7)
        return [Sampler().sample(logits, params, [gen]).token_ids[0] for _ in range(20)]

    assert run() == run()


def test_logprobs_report_the_chosen_token_and_top_alternatives_of_the_raw_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    result = Sampler().sample(logits, [SamplingParams(temperature=0.0, logprobs=2)], [None])
    reference = torch.log_softmax(logits[0], dim=0)
    entry = result.logprobs[0]
    assert entry is not None
    assert entry.token_logprob == pytest.approx(float(reference[0]))
    assert [t for t, _ in entry.top] == [0, 1]
    assert entry.top[1][1] == pytest.approx(float(reference[1]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_out_of_range_parameters_are_refused_with_their_name(kwargs, name):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**kwargs)
