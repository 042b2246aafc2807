"""The response-length regressor: file round trip, input checks, and the bundled SmolLM2 weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.tiny_checkpoints import smollm2_gguf_path
from ttedge.checkpoint import load_checkpoint
from ttedge.engine.length_predictor import DEFAULT_WEIGHTS, LengthPredictor
from ttedge.tokenizer import Tokenizer


def random_predictor(vocab: int = 50, seed: int = 0) -> LengthPredictor:
    rng = np.random.default_rng(seed)
    return LengthPredictor(
        token_scores=rng.normal(size=vocab).astype(np.float32),
        bias=float(np.log(40.0)),
        max_tokens=256,
        metadata={"model": "test-model"},
    )


def random_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 30)).tolist() for _ in range(count)]


def test_file_round_trip_gives_the_same_predictions(tmp_path):
    predictor = random_predictor()
    path = tmp_path / "p.npz"
    predictor.save(path)
    loaded = LengthPredictor.load(path)
    prompts = random_prompts(50, 40, seed=1)
    assert loaded.max_tokens == 256 and loaded.metadata == {"model": "test-model"}
    np.testing.assert_array_equal(loaded.token_scores, predictor.token_scores)
    assert loaded.predict(prompts) == predictor.predict(prompts)


def test_prediction_is_the_mean_token_score_in_log_space():
    predictor = random_predictor()
    ids = [3, 3, 7, 49]
    expected = np.exp(predictor.bias + predictor.token_scores[ids].astype(np.float64).mean())
    assert predictor.predict([ids]) == [round(expected)]


def test_predictions_are_whole_tokens_within_range():
    predictor = LengthPredictor(np.array([-50.0, 0.0, 50.0], dtype=np.float32), bias=3.0, max_tokens=256)
    assert predictor.predict([[0], [1], [2], [0, 2]]) == [1, 20, 256, 20]


def test_token_ids_the_predictor_does_not_know_and_bad_weights_are_refused():
    predictor = random_predictor(vocab=50)
    with pytest.raises(ValueError, match=r"\[0, 50\).*trained for test-model"):
        predictor.predict([[1, 2, 50]])
    with pytest.raises(ValueError, match="empty prompt"):
        predictor.predict([[]])
    with pytest.raises(ValueError, match="finite"):
        LengthPredictor(np.array([1.0, np.nan], dtype=np.float32), 0.0, 256)


def test_folding_a_ridge_on_mean_embeddings_into_token_scores_is_exact():
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(50, 8))
    mean, scale, weights = rng.normal(size=8), rng.uniform(0.5, 2, size=8), rng.normal(size=8)
    predictor = LengthPredictor.from_embedding_ridge(embedding, mean, scale, weights, 3.5, max_tokens=256)
    for ids in random_prompts(50, 10, seed=4):
        direct = (embedding[ids].mean(0) - mean) / scale @ weights + 3.5
        assert predictor.predict_log([ids])[0] == pytest.approx(direct, abs=1e-4)


def test_bundled_weights_load_and_predict_sanely():
    predictor = LengthPredictor.load(DEFAULT_WEIGHTS)
    assert predictor.vocab_size == 49152  # SmolLM2's vocabulary
    assert predictor.max_tokens == 256 and "SmolLM2-135M" in str(predictor.metadata["model"])
    assert predictor.metadata["weight_format"] == "int4"  # labelled by the model as served by default


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.from_checkpoint(load_checkpoint(smollm2_gguf_path()))


def test_bundled_predictor_tells_short_answers_from_long_ones(smollm2_tokenizer):
    # None of these is in the training set; wording and topics differ from its templates.
    short = [
        "What is the capital of Italy?",
        "Is 13 a prime number? Answer yes or no.",
        "What is the chemical symbol for zinc?",
    ]
    long = [
        "Write a long, detailed story about a pirate who finds an old map.",
        "Write an essay about the history of aviation.",
        "Describe in detail how a nuclear reactor works.",
    ]

    def predict(texts: list[str]) -> list[int]:
        chats = [smollm2_tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        return LengthPredictor.load().predict([smollm2_tokenizer.encode(c, add_bos=False) for c in chats])

    short_lengths, long_lengths = predict(short), predict(long)
    assert max(short_lengths) < min(long_lengths)
    assert all(1 <= n <= 256 for n in short_lengths + long_lengths)
