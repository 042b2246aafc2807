"""The ``ttlang_kernels`` flag of the TT port (ttedge.models.llama.tt.ttlang): which decode ops it picks, why,
that the choice is logged, and that with tt-lang missing (as in this environment: tt-lang 1.1.1 pins ttnn
0.69.0, the tier pins 0.81.1) the model builds and decodes on ttnn's ops.

Mock validation (no numerics) for the model runs. What this tier cannot check: the kernel branches
themselves, which need tt-lang and a card (tests/kernels/test_hardware.py; the kernels' math and data flow
are tests/kernels/test_simulator.py's, in the simulator).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ttnn

from tests.tt.support import BATCH, SMOLLM2, SMOLLM2_PRESET, TINY, decode_page_table, random_weights
from ttedge.models.llama.tt import ttlang
from ttedge.models.llama.tt.model import Transformer
from ttedge.models.llama.tt.ttlang import TTNN_ONLY, KernelChoice, choose_kernels


def test_flag_off_is_ttnn_only() -> None:
    assert choose_kernels(False, SMOLLM2) == TTNN_ONLY


def test_without_tt_lang_the_flag_falls_back_to_ttnn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ttlang.__name__):
        choice = choose_kernels(True, SMOLLM2)
    assert not choice.residual_rmsnorm and not choice.swiglu
    assert "ttlang_kernels requested, but tt-lang is not installed: ttnn ops instead" in choice.reason
    assert f"TT port ops: {choice.describe()}" in caplog.messages
    assert choice.describe().startswith("residual+RMSNorm: ttnn, SwiGLU: ttnn")


def test_with_tt_lang_the_norm_is_fused_while_it_fits_l1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ttlang, "missing_compiler", lambda: None)
    assert choose_kernels(True, SMOLLM2) == KernelChoice(True, True, "ttlang_kernels on")
    # A 2048-wide hidden row (Llama-3.2-1B) and its buffers overflow a core's L1: ttnn's norm stays.
    wide = choose_kernels(True, dataclasses.replace(SMOLLM2, hidden_size=2048))
    assert wide.swiglu and not wide.residual_rmsnorm
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
    tokens = np.arange(BATCH, dtype=np.uint32)
    positions = np.arange(BATCH, dtype=np.int32) + 30
    logits = model.decode(tokens, positions, page_table)
    assert logits.shape[-2] == BATCH
