"""The batch-invariant mode: a token's logits are bit-identical whether it is decoded alone, decoded in a
padded batch beside longer sequences, or verified among drafts — the property that makes greedy
speculative output equal plain greedy output on models computing in bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
from ttedge.checkpoint import load_checkpoint
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import StepInput
from ttedge.runtime.cpu import CpuModelRunner

PROMPT = [5, 17, 3, 99, 42, 7, 8, 9, 10, 11, 200, 13]
OTHER = list(range(20, 90))


def runner(checkpoint: Path, fmt: str, batch_invariant: bool) -> CpuModelRunner:
    model = LlamaModel.from_checkpoint(load_checkpoint(checkpoint), fmt, batch_invariant=batch_invariant)
    return CpuModelRunner(model, 2**22)


def logits_three_ways(run: CpuModelRunner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last prompt token's logits: decoded alone, decoded beside a longer sequence, and verified as
    the first of four rows."""
    tables: list[list[int]] = [[], []]
    for table, tokens in zip(tables, (PROMPT, OTHER), strict=True):
        run.allocator.grow_table(table, len(tokens) + 4)
        run.run([StepInput(tokens[:-1], 0, table)])
    (alone,) = run.run([StepInput(PROMPT[-1:], len(PROMPT) - 1, tables[0])])
    beside, _ = run.run(
        [StepInput(PROMPT[-1:], len(PROMPT) - 1, tables[0]), StepInput(OTHER[-1:], len(OTHER) - 1, tables[1])]
    )
    (verified,) = run.run([StepInput([PROMPT[-1], 1, 2, 3], len(PROMPT) - 1, tables[0], all_logits=True)])
    return alone[0], beside[0], verified[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, vocab_size=512)
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"), config, random_state_dict(config, seed=5))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_tokens_logits_do_not_depend_on_the_batch(checkpoint: Path, fmt: str):
    alone, beside, verified = logits_three_ways(runner(checkpoint, fmt, batch_invariant=True))
    torch.testing.assert_close(beside, alone, rtol=0, atol=0)
    torch.testing.assert_close(verified, alone, rtol=0, atol=0)


def test_the_batch_invariant_mode_computes_the_same_model(checkpoint: Path):
    exact, _, _ = logits_three_ways(runner(checkpoint, "int8", batch_invariant=True))
    batched, _, _ = logits_three_ways(runner(checkpoint, "int8", batch_invariant=False))
    torch.testing.assert_close(exact, batched, rtol=0.02, atol=0.02)


def test_formats_that_switch_kernels_by_row_count_are_refused(checkpoint: Path):
    with pytest.raises(ValueError, match="row-independent weights"):
        runner(checkpoint, "auto", batch_invariant=True)
