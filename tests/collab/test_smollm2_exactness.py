"""On the real SmolLM2-135M: greedy output under every lossless drafter equals the big model's own
greedy output token for token, at batch 1 and in a mixed continuous batch.

The big model runs in the batch-invariant mode (int4 weights, whose kernels compute each row on its own,
and attention token by token), so a token verified among drafts, decoded alone or decoded beside other
sequences comes out bit for bit the same. Without it bfloat16 sums taken in another order flip near-ties
(docs/speculative.md, "Exactness").
"""

from __future__ import annotations

import pytest

from tests.fixtures.tiny_checkpoints import smollm2_gguf_path
from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.collab.strategies import Strategy
from ttedge.config import EngineSettings
from ttedge.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=40)
QUESTIONS = [
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox.",
    "Why is the sky blue?",
    "Write a Python function that reverses a list.",
]


@pytest.fixture(scope="module", params=["prompt-lookup", "self"])
def loaded(request: pytest.FixtureRequest) -> LoadedEngine:
    settings = EngineSettings(
        model=str(smollm2_gguf_path()),
        weight_format="int4",
        draft=request.param,
        kv_cache_mb=64,
        batch_invariant=True,
    )
    return load_engine(settings)


def prompts(loaded: LoadedEngine) -> list[list[int]]:
    tokenizer = loaded.tokenizer
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return [tokenizer.encode(c, add_bos=False) for c in chats]


def generate(loaded: LoadedEngine, batch: list[list[int]], strategy: Strategy) -> list[list[int]]:
    engine = loaded.engine
    seqs = [engine.add_request(p, GREEDY, strategy=strategy) for p in batch]
    for _ in engine.stream():
        pass
    return [s.output_ids for s in seqs]


def test_speculative_greedy_equals_plain_greedy_alone_and_batched(loaded: LoadedEngine):
    engine = loaded.engine
    before = engine.stats().collab.draft_tokens
    for prompt in prompts(loaded):
        assert generate(loaded, [prompt], Strategy.SPECULATIVE) == generate(loaded, [prompt], Strategy.PLAIN)
    batch = prompts(loaded)
    assert generate(loaded, batch, Strategy.SPECULATIVE) == generate(loaded, batch, Strategy.PLAIN)
    assert engine.stats().collab.draft_tokens > before  # drafts were verified, not skipped
