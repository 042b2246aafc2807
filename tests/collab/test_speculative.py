"""Verification rules: greedy acceptance, and rejection sampling that keeps the big model's distribution."""

from __future__ import annotations

import pytest
import torch

from ttedge.collab.drafters import PromptLookupDrafter
from ttedge.collab.speculative import next_draft_budget, verify
from ttedge.collab.strategies import CollabConfig
from ttedge.engine.sampling import SamplingParams, filtered_probs

GREEDY = SamplingParams(temperature=0.0)


def one_hot_logits(tokens: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_accepts_the_agreeing_prefix_then_adds_the_big_models_token():
    big_model = one_hot_logits([3, 4, 5, 6])
    assert verify(big_model, [3, 4, 5], GREEDY, None) == [3, 4, 5, 6]  # all accepted, plus a bonus
    assert verify(big_model, [3, 7, 5], GREEDY, None) == [3, 4]  # corrected at the first mismatch
    assert verify(big_model, [1, 4, 5], GREEDY, None) == [3]
    assert verify(big_model[:1], [], GREEDY, None) == [3]


def test_rows_must_match_the_drafts():
    with pytest.raises(ValueError, match="2 drafts need 3 rows"):
        verify(one_hot_logits([1, 2]), [1, 2], GREEDY, None)


SAMPLED = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3)]


@pytest.mark.parametrize("params", SAMPLED)
@pytest.mark.parametrize("draft", [0, 4])  # the most likely token, and one top-k may filter out
def test_sampled_tokens_follow_the_big_models_distribution(params: SamplingParams, draft: int):
    """Chi-square goodness of fit of each emitted position against the big model's filtered
    distribution, over 5000 verifications of the same two drafts."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0], [-1.0, 0.0, 1.0, 2.0, 0.5, 0.5], [0.0] * 6])
    expected = filtered_probs(logits, [params] * 3)
    generator = torch.Generator().manual_seed(1234)
    first = torch.zeros(6)
    second = torch.zeros(6)
    for _ in range(5000):
        emitted = verify(logits, [draft, 3], params, generator)
        first[emitted[0]] += 1
        if emitted[0] == draft and len(emitted) > 1:
            second[emitted[1]] += 1  # given the first draft was accepted, position 2 follows row 1
    if expected[0, draft] == 0:
        assert second.sum() == 0  # a draft the filters remove is never accepted
    for counts, probs in ((first, expected[0]), (second, expected[1])):
        if counts.sum() == 0:
            continue
        assert counts[probs == 0].sum() == 0  # filtered tokens never appear
        kept = probs > 0
        total = counts.sum()
        chi2 = float((((counts[kept] - total * probs[kept]) ** 2) / (total * probs[kept])).sum())
        # 99.9th percentile of chi-square with at most 5 degrees of freedom.
        assert chi2 < 20.5, (counts / total, probs)


def test_config_checks():
    with pytest.raises(ValueError, match="at least 1"):
        CollabConfig(PromptLookupDrafter(), num_draft_tokens=0)


def test_draft_budget_grows_after_full_acceptance_and_shrinks_after_a_rejection():
    config = CollabConfig(PromptLookupDrafter(), num_draft_tokens=6)
    assert next_draft_budget(2, drafted=2, accepted=2, config=config) == 4
    assert next_draft_budget(5, drafted=5, accepted=5, config=config) == 6  # capped at k
    assert next_draft_budget(4, drafted=4, accepted=1, config=config) == 3
    assert next_draft_budget(1, drafted=1, accepted=0, config=config) == 0  # paused
    fixed = CollabConfig(PromptLookupDrafter(), num_draft_tokens=6, adaptive=False)
    assert next_draft_budget(1, drafted=1, accepted=0, config=fixed) == 6
