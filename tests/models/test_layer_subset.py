"""A model made of a subset of another's layers (the self-speculative draft) computes what a model
loaded from those layers alone computes, shares the weights instead of copying them, and runs an exit
adapter between its last layer and the final norm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
from tests.models.conftest_helpers import full_sequence_logits
from ttedge.checkpoint import load_checkpoint
from ttedge.config import ModelConfig
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner

KEPT = [0, 2, 3]
TOKENS = [5, 17, 3, 99, 42, 7, 7, 120, 64]


def load(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> LlamaModel:
    return LlamaModel.from_checkpoint(load_checkpoint(write_hf_checkpoint(directory, config, state)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaModel, LlamaModel]:
    config = tiny_config(num_layers=4)
    state = random_state_dict(config, seed=3)
    shallow_config = tiny_config(num_layers=len(KEPT))
    shallow_state = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate(KEPT):
        prefix = f"layers.{old}."
        shallow_state |= {
            f"layers.{new}." + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)
        }
    return load(tmp_path_factory.mktemp("full"), config, state), load(
        tmp_path_factory.mktemp("shallow"), shallow_config, shallow_state
    )


def test_subset_equals_a_model_of_those_layers(models: tuple[LlamaModel, LlamaModel]) -> None:
    full, shallow = models
    subset = full.layer_subset(KEPT)
    assert subset.config.num_layers == len(KEPT)
    assert subset.layers[1].qkv is full.layers[2].qkv  # shared, not copied
    expected = full_sequence_logits(CpuModelRunner(shallow, 2**20), TOKENS)
    torch.testing.assert_close(full_sequence_logits(CpuModelRunner(subset, 2**20), TOKENS), expected)
    assert not torch.allclose(full_sequence_logits(CpuModelRunner(full, 2**20), TOKENS), expected)


def test_exit_adapter_runs_before_the_final_norm(models: tuple[LlamaModel, LlamaModel]) -> None:
    full, _ = models
    plain = full_sequence_logits(CpuModelRunner(full.layer_subset(KEPT), 2**20), TOKENS)
    identity = full.layer_subset(KEPT, exit_adapter=lambda h: h)
    torch.testing.assert_close(full_sequence_logits(CpuModelRunner(identity, 2**20), TOKENS), plain)
    # A zero hidden state stays zero through the final norm, so every logit is zero.
    zeroing = full.layer_subset(KEPT, exit_adapter=torch.zeros_like)
    assert not full_sequence_logits(CpuModelRunner(zeroing, 2**20), TOKENS).any()


@pytest.mark.parametrize("indices", [[], [2, 1], [1, 1], [0, 4], [-1, 0]])
def test_bad_layer_indices_are_refused(models: tuple[LlamaModel, LlamaModel], indices: list[int]) -> None:
    with pytest.raises(ValueError, match="layer indices"):
        models[0].layer_subset(indices)
