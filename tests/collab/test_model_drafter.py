"""The small model's drafter: greedy drafts equal the small model's own greedy decoding, its KV cache
rolls back exactly when a draft is rejected, and it degrades (forgets others, then drafts nothing)
when its memory runs out."""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_engine import tiny_engine, tiny_parts, tiny_small_model
from ttedge.collab.drafters import DraftRequest
from ttedge.engine.sampling import SamplingParams

PROMPT = [5, 17, 3, 99, 42, 7]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_parts(tmp_path_factory.mktemp("tiny"), seed=3)


def small_greedy(parts, prompt: list[int], n: int) -> list[int]:
    """The small model's greedy continuation through a plain engine over the same layers."""
    small = (parts[0].layer_subset([0]), parts[1])
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return tiny_engine(small).generate([prompt], params)[0].output_ids


def test_drafts_are_the_small_models_greedy_tokens(parts):
    drafter = tiny_small_model(parts, [0])
    (draft,) = drafter.propose([DraftRequest("a", PROMPT, 6)])
    assert draft.tokens == small_greedy(parts, PROMPT, 6)
    assert len(draft.confidences) == 6 and all(0 < c <= 1 for c in draft.confidences)
    assert not draft.unsure


def test_a_rejected_draft_is_rolled_back_exactly(parts):
    drafter = tiny_small_model(parts, [0])
    (first,) = drafter.propose([DraftRequest("a", PROMPT, 4)])
    # The big model keeps one draft and replaces the second with a token of its own.
    replaced = (first.tokens[1] + 1) % 256
    context = [*PROMPT, first.tokens[0], replaced]
    (after,) = drafter.propose([DraftRequest("a", context, 4)])
    assert after.tokens == small_greedy(parts, context, 4)  # no stale key or value was read
    fresh = tiny_small_model(parts, [0])
    assert fresh.propose([DraftRequest("b", context, 4)])[0].tokens == after.tokens


def test_batched_drafts_equal_drafts_one_at_a_time(parts):
    contexts = {"a": PROMPT, "b": [9, 10, 11] * 5, "c": [200]}
    batched = tiny_small_model(parts, [0]).propose(
        [DraftRequest(k, c, 3 + len(k)) for k, c in contexts.items()]
    )
    for (key, context), draft in zip(contexts.items(), batched, strict=True):
        assert draft.tokens == small_greedy(parts, context, 3 + len(key))


def test_low_confidence_ends_a_draft(parts):
    drafter = tiny_small_model(parts, [0])
    (reference,) = drafter.propose([DraftRequest("a", PROMPT, 6)])
    threshold = min(reference.confidences) + 1e-6
    (draft,) = drafter.propose([DraftRequest("a", PROMPT, 6, min_confidence=threshold)])
    first_unsure = next(i for i, c in enumerate(reference.confidences) if c < threshold)
    assert draft.unsure and draft.tokens == reference.tokens[:first_unsure]


def test_memory_pressure_forgets_other_sequences_then_drafts_nothing(parts):
    drafter = tiny_small_model(parts, [0], num_blocks=2)  # 64 tokens
    assert drafter.propose([DraftRequest("a", PROMPT, 4)])[0].tokens
    assert drafter.propose([DraftRequest("b", list(range(40)), 4)])[0].tokens
    assert drafter.num_cached_sequences == 1  # "a" was forgotten to make room for "b"
    (too_long,) = drafter.propose([DraftRequest("c", list(range(70)), 4)])
    assert too_long.tokens == [] and drafter.runner.allocator.num_free == 2
    drafter.release("b")
    assert drafter.num_cached_sequences == 0


def test_next_logits_match_the_small_models_forward(parts):
    drafter = tiny_small_model(parts, [0])
    (logits,) = drafter.next_logits([("a", PROMPT)])
    assert logits is not None and int(logits.argmax()) == small_greedy(parts, PROMPT, 1)[0]
