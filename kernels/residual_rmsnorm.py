"""Fused residual add and RMSNorm: ``h = x + residual``, ``y = h * rsqrt(mean(h**2) + eps) * weight``.

A pre-norm decoder layer does this twice per layer: the residual stream ``h`` is written back for the next
add and ``y`` feeds the next projection. Unfused that is an add (two reads, one write) and a norm (a read and
a write); fused, ``x`` and ``residual`` are read once and ``h`` and ``y`` written once.

Rows are dealt out over the grid's nodes one tile row (32 rows) at a time. A node takes a whole tile row of
the hidden dimension as one block, so the sum of squares, the scale and the product all stay in L1; the
hidden size is bounded by L1 (``footprint.residual_rmsnorm_l1_bytes``: 434 KiB at 576, too much at 2048).
``weight`` is a ``[32, hidden]`` tensor, the norm weight repeated on every row of a tile, read once per node.
"""

from __future__ import annotations

from typing import Any

import torch

from ttedge.kernels.dsl import TILE, device_tensor, host_tensor, pad_rows, ttl, ttnn
from ttedge.kernels.footprint import BFLOAT16_TILE_BYTES

TILE_BYTES = BFLOAT16_TILE_BYTES  # every tensor of this kernel is bfloat16


def build(grid: tuple[int, int], eps: float) -> Any:
    """The operation ``(x, residual, weight, h_out, y_out) -> None`` on ``grid``."""

    def residual_rmsnorm(x: Any, residual: Any, weight: Any, h_out: Any, y_out: Any) -> None:
        row_tiles = x.shape[0] // TILE
        hidden_tiles = x.shape[1] // TILE
        inv_hidden = 1.0 / x.shape[1]
        rows_per_node = -(-row_tiles // ttl.grid_size(dims=1))
        row_block = (1, hidden_tiles)

        x_dfb = ttl.make_dataflow_buffer_like(x, shape=row_block, block_count=2)
        residual_dfb = ttl.make_dataflow_buffer_like(residual, shape=row_block, block_count=2)
        weight_dfb = ttl.make_dataflow_buffer_like(weight, shape=row_block, block_count=1)
        # h is needed twice by the compute thread (squares, then the product), so it keeps its own copy;
        # another copy goes to the writer.
        h_dfb = ttl.make_dataflow_buffer_like(x, shape=row_block, block_count=1)
        squares_dfb = ttl.make_dataflow_buffer_like(x, shape=row_block, block_count=1)
        sum_dfb = ttl.make_dataflow_buffer_like(x, shape=(1, 1), block_count=1)
        scale_dfb = ttl.make_dataflow_buffer_like(x, shape=row_block, block_count=1)
        h_out_dfb = ttl.make_dataflow_buffer_like(h_out, shape=row_block, block_count=2)
        y_out_dfb = ttl.make_dataflow_buffer_like(y_out, shape=row_block, block_count=2)

        @ttl.compute()
        def compute() -> None:
            first = ttl.node(dims=1) * rows_per_node
            if first < row_tiles:
                with weight_dfb.wait() as w:
                    for _ in range(first, min(first + rows_per_node, row_tiles)):
                        with x_dfb.wait() as xb, residual_dfb.wait() as rb, h_dfb.reserve() as hb:
                            hb.store(xb + rb)
                        with h_dfb.wait() as hb:
                            with h_out_dfb.reserve() as ho:
                                ho.store(hb)
                            with squares_dfb.reserve() as sq:
                                sq.store(hb * hb)
                            # Row sums land in column 0 of the reduced tile; the broadcast reads only that.
                            with squares_dfb.wait() as sq, sum_dfb.reserve() as total:
                                total.store(ttl.math.reduce_sum(sq, dims=[1], shape=(1, 1)))
                            with sum_dfb.wait() as total, scale_dfb.reserve() as scale:
                                mean_square = total * ttl.block.fill(inv_hidden, shape=(1, 1))
                                inv_rms = ttl.math.rsqrt(mean_square + ttl.block.fill(eps, shape=(1, 1)))
                                scale.store(ttl.block.broadcast(inv_rms, dims=[1], shape=row_block))
                            with scale_dfb.wait() as scale, y_out_dfb.reserve() as yo:
                                yo.store(hb * scale * w)

        @ttl.datamovement()
        def read() -> None:
            first = ttl.node(dims=1) * rows_per_node
            # A node past the last row (more nodes than rows) reads no weight: a buffer waited on must be
            # consumed.
            if first < row_tiles:
                with weight_dfb.reserve() as w:
                    ttl.copy(weight[0:1, 0:hidden_tiles], w).wait()
                for row in range(first, min(first + rows_per_node, row_tiles)):
                    with x_dfb.reserve() as xb, residual_dfb.reserve() as rb:
                        x_read = ttl.copy(x[row : row + 1, 0:hidden_tiles], xb)
                        residual_read = ttl.copy(residual[row : row + 1, 0:hidden_tiles], rb)
                        x_read.wait()
                        residual_read.wait()

        @ttl.datamovement()
        def write() -> None:
            first = ttl.node(dims=1) * rows_per_node
            for row in range(first, min(first + rows_per_node, row_tiles)):
                with h_out_dfb.wait() as ho:
                    ttl.copy(ho, h_out[row : row + 1, 0:hidden_tiles]).wait()
                with y_out_dfb.wait() as yo:
                    ttl.copy(yo, y_out[row : row + 1, 0:hidden_tiles]).wait()

    return ttl.operation(grid=grid)(residual_rmsnorm)


def run(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    grid: tuple[int, int],
    device: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)`` for host tensors ``x``, ``residual`` ``[rows, hidden]`` and ``weight`` ``[hidden]``."""
    rows, hidden = x.shape
    x_device = device_tensor(pad_rows(x), ttnn.bfloat16, device)
    residual_device = device_tensor(pad_rows(residual), ttnn.bfloat16, device)
    weight_device = device_tensor(weight.expand(TILE, hidden), ttnn.bfloat16, device)
    h_out = device_tensor(torch.zeros_like(pad_rows(x)), ttnn.bfloat16, device)
    y_out = device_tensor(torch.zeros_like(pad_rows(x)), ttnn.bfloat16, device)
    build(grid, eps)(x_device, residual_device, weight_device, h_out, y_out)
    return host_tensor(h_out)[:rows], host_tensor(y_out)[:rows]
