"""The kernels' L1 footprints per node, importable without TT-Lang: the TT port decides with them whether a
kernel fits before it imports one. Each is the sum of the kernel's dataflow buffers (blocks x block
count); ``tests/kernels/test_simulator.py`` checks them against what the simulator allocates."""

from __future__ import annotations

TILE = 32
BFLOAT16_TILE_BYTES = TILE * TILE * 2


def residual_rmsnorm_l1_bytes(hidden: int) -> int:
    """x, residual, h_out, y_out double-buffered and weight, h, squares, scale single: 12 blocks of a tile row
    of ``hidden``; the row sums: one tile."""
    return (12 * (hidden // TILE) + 1) * BFLOAT16_TILE_BYTES


def swiglu_l1_bytes(block_rows: int = 1, block_cols: int = 1) -> int:
    """gate, up and out, double-buffered blocks."""
    return 3 * 2 * block_rows * block_cols * BFLOAT16_TILE_BYTES
