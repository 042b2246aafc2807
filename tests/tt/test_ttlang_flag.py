"""The ``ttlang_kernels`` flag of the TT port (ttedge.models.llama.tt.ttlang): which decode ops it picks, why,
that the choice is logged, and that with tt-lang missing (as in this environment: tt-lang 1.1.1 pins ttnn
0.69.0, the tier pins 0.81.1) the model builds, decodes and verifies greedy drafts on ttnn's ops.

Mock validation (no numerics) for the model runs; the layout of the device verification's grids is checked
on the host. What this tier cannot check: the kernel branches
themselves, which need tt-lang and a card (tests/kernels/test_hardware.py; the kernels' math and data flow
are tests/kernels/test_simulator.py's, in the simulator).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ttnn

import ttedge.kernels
from tests.tt.conftest import BOARDS
from tests.tt.support import BATCH, SMOLLM2, SMOLLM2_PRESET, TINY, decode_page_table, random_weights
from ttedge.models.llama.tt import ttlang
from ttedge.models.llama.tt.greedy import verification_grids
from ttedge.models.llama.tt.model import Transformer
from ttedge.models.llama.tt.ttlang import TTNN_ONLY, AcceptedLengths, KernelChoice, choose_kernels
from ttedge.runtime.base import StepInput
from ttedge.runtime.tt import TtDeviceRunner


def test_flag_off_is_ttnn_only() -> None:
    assert choose_kernels(False, SMOLLM2) == TTNN_ONLY


def test_without_tt_lang_the_flag_falls_back_to_ttnn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ttlang.__name__):
        choice = choose_kernels(True, SMOLLM2)
    assert choice == dataclasses.replace(TTNN_ONLY, reason=choice.reason)
    assert "ttlang_kernels requested, but tt-lang is not installed: ttnn ops instead" in choice.reason
    assert f"TT port ops: {choice.describe()}" in caplog.messages
    assert choice.describe().startswith(
        "residual+RMSNorm: ttnn, SwiGLU: ttnn, rotary: ttnn, draft acceptance: ttnn ("
    )


def test_with_tt_lang_the_norm_is_fused_while_it_fits_l1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ttlang, "missing_compiler", lambda: None)
    assert choose_kernels(True, SMOLLM2) == KernelChoice(True, True, True, True, "ttlang_kernels on")
    assert choose_kernels(True, SMOLLM2).describe() == (
        "residual+RMSNorm: TT-Lang kernel, SwiGLU: TT-Lang kernel, rotary: TT-Lang kernel, "
        "draft acceptance: TT-Lang kernel (ttlang_kernels on)"
    )
    # A 2048-wide hidden row (Llama-3.2-1B) and its buffers overflow a core's L1: ttnn's norm stays.
    wide = choose_kernels(True, dataclasses.replace(SMOLLM2, hidden_size=2048))
    assert wide.swiglu and wide.rotary and wide.speculative_acceptance and not wide.residual_rmsnorm
    assert "the fused norm needs 1574912 B of L1 per core at hidden 2048" in wide.reason


@pytest.mark.parametrize("board", ["n150", "p150"])
def test_flagged_model_decodes_on_the_fallback(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, caplog: pytest.LogCaptureFixture
) -> None:
    page_table, blocks = decode_page_table()
    with caplog.at_level(logging.INFO, logger=ttlang.__name__):
        model = Transformer(
            mock_device(board), TINY, random_weights(TINY), SMOLLM2_PRESET, blocks, ttlang_kernels=True
        )
    assert model.kernels.reason.startswith("ttlang_kernels requested, but tt-lang is not installed")
    assert sum("TT port ops:" in message for message in caplog.messages) == 1  # once per model
    for layer in model.layers:
        assert layer.mlp_norm.fused is None and layer.mlp.silu_multiply.kernel is None
        assert layer.attention.rotary.kernel is None
    tokens = np.arange(BATCH, dtype=np.uint32)
    positions = np.arange(BATCH, dtype=np.int32) + 30
    logits = model.decode(tokens, positions, page_table)
    assert logits.shape[-2] == BATCH


def test_verification_grids_verify_greedily() -> None:
    """The device's steps on ``verification_grids`` (emulated in numpy: the id gather, the fallback's
    ``ne`` / prefix matmul / ``eq`` 0 / row sum, the token gather) decide what the engine's greedy
    verification does: drafts up to the first disagreement, then the target's token."""
    ids = np.random.default_rng(0).integers(0, 128_256, 80)
    ids[41] = 0  # token 0 where a bonus token is read: the padding after the drafts must not match it
    rows = [np.arange(3, 9), np.array([12]), np.array([20, 40, 41]), np.arange(50, 55)]
    drafts = [
        [int(ids[4]), int(ids[5]), int(ids[6]) + 1, int(ids[7])],  # two accepted, the third rejected
        [],  # no drafts: the target's token at the last row
        [int(ids[20]), int(ids[40])],  # all accepted, across two kept pieces: the bonus token
        [int(ids[50]) + 1, int(ids[51]), int(ids[52]), int(ids[53])],  # the first rejected
    ]
    where, draft_grid = verification_grids(rows, drafts)
    assert where.shape == draft_grid.shape == (32, 32)
    target = ids[where].astype(np.float32)
    rejected_so_far = (draft_grid != target).astype(np.float32) @ np.triu(np.ones((32, 32), np.float32))
    accepted = (rejected_so_far == 0).sum(axis=1)
    tokens = ids[where][np.arange(32), accepted]
    assert [(int(a), int(t)) for a, t in zip(accepted, tokens, strict=False)][:4] == [
        (2, int(ids[6])),
        (0, int(ids[12])),
        (2, int(ids[41])),
        (0, int(ids[50])),
    ]
    assert (draft_grid[4:] == AcceptedLengths.DRAFT_PAD).all()
    with pytest.raises(ValueError, match="sequence 0: 2 drafts need 3 argmax rows, got 2"):
        verification_grids([np.arange(2)], [[1, 2]])


@pytest.mark.parametrize("board", BOARDS)
def test_greedy_verification_runs_on_the_fallback(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = TtDeviceRunner(
        mock_device(board), TINY, random_weights(TINY), SMOLLM2_PRESET, 16, 128, ttlang_kernels=True
    )
    assert runner.accepted_lengths.kernel is None
    grids: list[tuple[int, ...]] = []
    count = AcceptedLengths.__call__

    def record(self: AcceptedLengths, draft: ttnn.Tensor, target: ttnn.Tensor) -> ttnn.Tensor:
        grids.append(tuple(draft.shape))
        return count(self, draft, target)

    monkeypatch.setattr(AcceptedLengths, "__call__", record)
    inputs = [
        StepInput([7, 8, 9, 10], 40, [0, 1], all_logits=True),  # drafts inside a block: one decode step
        StepInput([3], 20, [2]),  # plain decode
        StepInput([1, 2, 3, 4, 5], 62, [3, 4, 5], all_logits=True),  # across a block: decode, then prefill
    ]
    verdicts = runner.verify_greedy(inputs, [[8, 9, 10], [], [2, 3, 4, 5]])
    # The mock reads back zeros: every argmax is token 0, so no draft here is accepted.
    assert verdicts == [(0, 0), (0, 0), (0, 0)]
    assert grids == [(32, 32)]  # one comparison for the whole step
    with pytest.raises(ValueError, match="input 0: its drafts must end its token ids, with all_logits"):
        runner.verify_greedy(inputs[:1], [[9, 10, 11]])


class StandInKernel:
    """In place of a compiled TT-Lang operation (tt-lang cannot be installed here): records the shapes of
    the device tensors it is called with and computes nothing."""

    def __init__(self, calls: dict[str, list[tuple[tuple[int, ...], ...]]], name: str):
        self.calls, self.name = calls, name

    def __call__(self, *tensors: ttnn.Tensor) -> None:
        self.calls.setdefault(self.name, []).append(tuple(tuple(t.shape) for t in tensors))


@pytest.mark.parametrize("board", BOARDS)
def test_the_kernel_branches_ttnn_glue_runs_with_stand_in_kernels(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ttnn ops around each kernel (re-layouts, reshapes to the kernels' 2-D tile grids, outputs)
    validated on the mock, with stand-ins for the kernels; what the kernels compute is the simulator's."""
    calls: dict[str, list[tuple[tuple[int, ...], ...]]] = {}
    for name in ("residual_rmsnorm", "swiglu", "rotary", "speculative_acceptance"):
        module = types.ModuleType(f"ttedge.kernels.{name}")
        module.build = lambda *args, name=name, **kwargs: StandInKernel(calls, name)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setattr(ttedge.kernels, name, module, raising=False)
    monkeypatch.setattr(ttlang, "missing_compiler", lambda: None)
    runner = TtDeviceRunner(
        mock_device(board), TINY, random_weights(TINY), SMOLLM2_PRESET, 16, 128, ttlang_kernels=True
    )
    assert runner.model.kernels == KernelChoice(True, True, True, True, "ttlang_kernels on")
    verdicts = runner.verify_greedy(
        [StepInput([7, 8, 9], 40, [0, 1], all_logits=True), StepInput([3], 20, [2])], [[8, 9], []]
    )
    assert len(verdicts) == 2
    users, hidden, head_dim = BATCH, TINY.hidden_size, TINY.head_dim
    per_layer = TINY.num_layers
    # Q and K rotated as [users x heads, head_dim] grids, with a table row per row.
    q_rows, k_rows = (users * TINY.num_heads, head_dim), (users * TINY.num_kv_heads, head_dim)
    rotation = (head_dim, head_dim)
    assert (
        calls["rotary"]
        == [
            (q_rows, q_rows, q_rows, rotation, q_rows),
            (k_rows, k_rows, k_rows, rotation, k_rows),
        ]
        * per_layer
    )
    assert calls["residual_rmsnorm"] == [((users, hidden),) * 5] * per_layer
    assert len(calls["swiglu"]) == per_layer
    assert calls["speculative_acceptance"] == [((32, 32), (32, 32), (32, 32), (32, 32))]
