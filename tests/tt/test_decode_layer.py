"""A Llama decode layer at SmolLM2-135M shapes runs, op by op, on each mock system.

Mock validation (no numerics): every op's checks and allocations are ttnn's own, the results are zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import ttnn

from tests.tt.support import BATCH, SMOLLM2, SMOLLM2_PRESET, decode_layer

HIDDEN_ROW = ttnn.Shape([1, 1, BATCH, SMOLLM2.hidden_size])


@pytest.mark.parametrize("board", ["n150", "p150"])
def test_decode_layer_on_one_chip(mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str) -> None:
    # docs/tt-validation.md: an earlier note saw SDPA decode refused on p150; it runs here, at every batch.
    run = decode_layer(mock_device(board), SMOLLM2, SMOLLM2_PRESET)
    assert run.output.shape == HIDDEN_ROW
    assert run.attention.shape == HIDDEN_ROW
    assert run.attention.memory_config().memory_layout == ttnn.TensorMemoryLayout.WIDTH_SHARDED
    assert run.output.dtype == ttnn.bfloat16


def test_decode_layer_on_n300_splits_the_mlp(mock_mesh: Callable[[tuple[int, int]], ttnn.MeshDevice]) -> None:
    mesh = mock_mesh((1, 2))
    run = decode_layer(mesh, SMOLLM2, SMOLLM2_PRESET)
    # The partial sums of the split MLP are reduce-scattered and gathered back to the full hidden row.
    assert run.mlp.shape == HIDDEN_ROW
    assert run.output.shape == HIDDEN_ROW
    assert len(ttnn.get_device_tensors(run.output)) == 2
