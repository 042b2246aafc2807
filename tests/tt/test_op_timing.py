"""ttedge.models.llama.tt.op_timing, the TT part of scripts/bench_kernels.py: one decode layer's ops build
and run on mock n150 and p150, each with its cost for the roofline.

Mock validation (no numerics): nothing executes on a mock cluster, so the times are not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import ttnn

from tests.tt.support import SMOLLM2, SMOLLM2_PRESET, TINY
from ttedge.models.llama.tt.op_timing import card_of, decode_layer_ops, time_ops
from ttedge.perf.hardware import BLACKHOLE_P150, WORMHOLE_N150
from ttedge.runtime.tt_host import TILE_BYTES

OPS = ["attn_norm", "attention", "residual_norm", "w1", "w3", "silu_multiply", "w2", "residual_add"]


@pytest.mark.parametrize(("board", "card"), [("n150", WORMHOLE_N150), ("p150", BLACKHOLE_P150)])
def test_decode_layer_ops_run_and_carry_their_cost(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, card: object
) -> None:
    mesh = mock_device(board)
    assert card_of(mesh) is card
    ops = decode_layer_ops(mesh, TINY, SMOLLM2_PRESET, context=100, ttlang_kernels=False)
    timings = time_ops(mesh, ops, iterations=1)
    assert [t.op for t in timings] == OPS
    for timing in timings:
        assert timing.seconds > 0 and timing.cost.bytes_moved > 0 and timing.cost.flops > 0
    # SmolLM2's performance preset has w1 in bfloat8_b: 128 x 256 weights are 32 tiles of 1088 bytes.
    w1 = next(t for t in timings if t.op == "w1").cost
    assert w1.data_format == "bfloat8_b"
    assert w1.bytes_moved == 32 * TILE_BYTES["bfloat8_b"] + 32 * (128 + 256) * 2


def test_smollm2_layer_ops_run(mock_device: Callable[[str | Path], ttnn.MeshDevice]) -> None:
    mesh = mock_device("n150")
    ops = decode_layer_ops(mesh, SMOLLM2, SMOLLM2_PRESET, context=256, ttlang_kernels=True)
    assert [t.op for t in time_ops(mesh, ops, iterations=1)] == OPS
