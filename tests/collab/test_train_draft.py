"""scripts/train_draft.py on a tiny random model: what it measures is what the draft computes, and its
training step lowers KL(target || draft)."""

from __future__ import annotations

import random

import pytest
import torch

from scripts.train_draft import (
    Example,
    TrainableAdapter,
    argmax_tokens,
    draft_final_hidden,
    draft_kl,
    exit_hidden,
    expected_speedup,
    parse_subset,
    prefill_hidden,
    train_adapter,
)
from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
from ttedge.checkpoint import load_checkpoint
from ttedge.collab.exit_adapter import describe_layers
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner

SUBSET = (0,)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> LlamaModel:
    config = tiny_config(num_layers=3, tie_word_embeddings=True)
    # Larger weights than the fixture's default, so that the layers after the first change the output.
    state = {
        name: (1 + (t - 1) * 5) if t.dim() == 1 else t * 5
        for name, t in random_state_dict(config, seed=7).items()
    }
    path = write_hf_checkpoint(tmp_path_factory.mktemp("target"), config, state)
    return LlamaModel.from_checkpoint(load_checkpoint(path))


def examples(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [
        Example(
            i,
            False,
            [rng.randrange(256) for _ in range(rng.randint(3, 9))],
            [rng.randrange(256) for _ in range(20)],
        )
        for i in range(count)
    ]


def positions(target: LlamaModel, data: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    runner = CpuModelRunner(target, 2**22)
    return prefill_hidden(target, runner, data), exit_hidden(target, SUBSET, runner, data)


def test_measured_draft_is_the_real_draft(target: LlamaModel):
    """The script scores a draft from cached exit states; a draft model built from the same adapter must
    give the very same final hidden states."""
    data = examples(3, seed=1)
    teacher, exits = positions(target, data)
    adapter, _ = train_adapter(
        exits, teacher, target.embed, target.norm, 1e-5, rank=4, steps=2, batch=8, lr=1e-2, seed=0
    )
    inference = adapter.inference(target.dtype)
    assert inference.down.abs().max() > 0, "two steps should have moved the output projection"
    draft = target.layer_subset(SUBSET, inference)
    expected = prefill_hidden(draft, CpuModelRunner(draft, 2**22), data)
    torch.testing.assert_close(draft_final_hidden(exits, target, inference), expected, rtol=0, atol=0)


def test_training_lowers_the_kl(target: LlamaModel):
    teacher, exits = positions(target, examples(24, seed=2))
    head = target.embed.bfloat16()

    def kl(adapter: TrainableAdapter) -> float:
        with torch.no_grad():
            return float(draft_kl(adapter, exits, teacher, head, target.norm, 1e-5))

    adapter, losses = train_adapter(
        exits, teacher, head, target.norm, 1e-5, rank=16, steps=40, batch=64, lr=1e-2, seed=0
    )
    before, after = kl(TrainableAdapter(64, 16, 1e-5, seed=0)), kl(adapter)
    assert losses[0] == pytest.approx(before, rel=0.3)  # training starts from the identity adapter
    assert after < 0.7 * before
    expected = argmax_tokens(target.lm_head, teacher)
    untrained = argmax_tokens(target.lm_head, draft_final_hidden(exits, target, None))
    trained = argmax_tokens(
        target.lm_head, draft_final_hidden(exits, target, adapter.inference(target.dtype))
    )
    assert (trained == expected).float().mean() > (untrained == expected).float().mean()


def test_expected_speedup():
    # Every draft accepted: k + 1 tokens for k free drafts and a verification as cheap as a decode.
    assert expected_speedup(1.0, 0.0, 1.0, 4) == 5
    # Nothing accepted: one token for the drafts and the verification.
    assert expected_speedup(0.0, 0.25, 1.0, 2) == pytest.approx(1 / 1.5)
    assert expected_speedup(0.5, 0.1, 1.1, 2) == pytest.approx(1.75 / 1.3)


@pytest.mark.parametrize("text", ["0-5", "0-3,29", "0,6,12,18,24,29", "7"])
def test_subset_names_round_trip(text: str):
    assert describe_layers(parse_subset(text)) == text
