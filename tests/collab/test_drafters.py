from __future__ import annotations

import pytest

from ttedge.collab.drafters import PromptLookupDrafter


def test_proposes_what_followed_the_most_recent_longest_match():
    drafter = PromptLookupDrafter(max_ngram=3)
    # "1 2" occurs twice before the end; the later one (followed by 4) wins.
    assert drafter.lookup([1, 2, 3, 1, 2, 4, 1, 2], 2) == [4, 1]
    # A 3-gram match (5 1 2) beats a more recent 2-gram one (1 2).
    assert drafter.lookup([5, 1, 2, 9, 8, 1, 2, 7, 5, 1, 2], 3) == [9, 8, 1]


def test_proposal_stops_at_max_tokens_and_at_the_context_end():
    drafter = PromptLookupDrafter()
    assert drafter.lookup([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]
    assert drafter.lookup([1, 2, 3, 4, 1, 2, 3], 10) == [4, 1, 2, 3]
    assert drafter.lookup([9, 9, 9], 4) == [9]


def test_nothing_to_propose():
    drafter = PromptLookupDrafter(min_ngram=2)
    assert drafter.lookup([5, 6, 7], 2) == []
    assert drafter.lookup([1], 3) == []
    assert drafter.lookup([1, 2, 1], 0) == []
    # Only a 1-gram matches (1 ... 1), which min_ngram=2 does not accept.
    assert drafter.lookup([1, 2, 3, 1], 2) == []
    assert PromptLookupDrafter(min_ngram=1).lookup([1, 2, 3, 1], 2) == [2, 3]


def test_lookback_bounds_the_search():
    context = [7, 8, *range(100, 140), 7]
    assert PromptLookupDrafter().lookup(context, 1) == [8]
    assert PromptLookupDrafter(max_lookback=20).lookup(context, 1) == []


def test_bad_ngram_range_is_refused():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)
