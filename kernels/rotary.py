"""Rotary position embedding, ``out = x * cos + (x @ rotation) * sin`` per head: Hugging Face's rotate-half
convention with ``rotation_matrix`` (``rotate_half([a, b]) = [-b, a]`` over the head's halves), the TT port's
Meta pair order with its transformation matrix on each tile of a head (``rope_tables.head_rotation``).

``x`` is ``[rows, heads * head_dim]`` (a row per token, or per user in decode), ``cos`` and ``sin`` are
``[rows, head_dim]`` (each row at its own position, shared by all heads), ``rotation`` is the
``[head_dim, head_dim]`` matrix with ``x @ rotation == rotate_half(x)`` (``rotation_matrix``). Taking the
rotation as a matmul, as tt-metal's ``rotary_embedding_llama`` does with its transformation matrix, works for
every head size that is a whole number of tiles, 32 included, where the halves are not whole tiles.

The work is one (tile row, head) pair at a time, dealt out over the grid's nodes, so a decode step of 32 users
(a single tile row) still spreads over as many nodes as there are heads. Each pair reads its cos and sin
tiles: as many tiles as ``x``'s, the price of that spread.
"""

from __future__ import annotations

from typing import Any

import torch

from ttedge.kernels.dsl import TILE, device_tensor, host_tensor, pad_rows, ttl, ttnn
from ttedge.kernels.footprint import BFLOAT16_TILE_BYTES

TILE_BYTES = BFLOAT16_TILE_BYTES  # every tensor of this kernel is bfloat16


def rotation_matrix(head_dim: int) -> torch.Tensor:
    """``R`` with ``x @ R == cat(-x[d/2:], x[:d/2])`` for rows ``x`` of ``head_dim`` elements."""
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim)
    rotation[half:, :half] = -torch.eye(half)
    rotation[:half, half:] = torch.eye(half)
    return rotation


def build(grid: tuple[int, int], head_dim: int) -> Any:
    """The operation ``(x, cos, sin, rotation, out) -> None`` on ``grid``."""
    if head_dim % TILE:
        raise ValueError(f"head_dim {head_dim} is not a whole number of {TILE}-wide tiles")
    head_tiles = head_dim // TILE

    def rotary(x: Any, cos: Any, sin: Any, rotation: Any, out: Any) -> None:
        row_tiles = x.shape[0] // TILE
        heads = x.shape[1] // head_dim
        units = row_tiles * heads
        units_per_node = -(-units // ttl.grid_size(dims=1))
        head_block = (1, head_tiles)

        x_dfb = ttl.make_dataflow_buffer_like(x, shape=head_block, block_count=2)
        cos_dfb = ttl.make_dataflow_buffer_like(cos, shape=head_block, block_count=2)
        sin_dfb = ttl.make_dataflow_buffer_like(sin, shape=head_block, block_count=2)
        rotation_dfb = ttl.make_dataflow_buffer_like(rotation, shape=(head_tiles, head_tiles), block_count=1)
        rotated_dfb = ttl.make_dataflow_buffer_like(x, shape=head_block, block_count=1)
        out_dfb = ttl.make_dataflow_buffer_like(out, shape=head_block, block_count=2)

        @ttl.compute()
        def compute() -> None:
            first = ttl.node(dims=1) * units_per_node
            if first < units:
                with rotation_dfb.wait() as rot:
                    for _ in range(first, min(first + units_per_node, units)):
                        with x_dfb.wait() as xb, cos_dfb.wait() as c, sin_dfb.wait() as s:
                            with rotated_dfb.reserve() as r:
                                r.store(xb @ rot)
                            with rotated_dfb.wait() as r, out_dfb.reserve() as o:
                                o.store(xb * c + r * s)

        @ttl.datamovement()
        def read() -> None:
            first = ttl.node(dims=1) * units_per_node
            # A node past the last unit (more nodes than units) reads nothing: a buffer waited on must be
            # consumed.
            if first < units:
                with rotation_dfb.reserve() as rot:
                    ttl.copy(rotation[0:head_tiles, 0:head_tiles], rot).wait()
                for unit in range(first, min(first + units_per_node, units)):
                    row = unit // heads
                    col = unit % heads * head_tiles
                    with x_dfb.reserve() as xb, cos_dfb.reserve() as c, sin_dfb.reserve() as s:
                        x_read = ttl.copy(x[row : row + 1, col : col + head_tiles], xb)
                        cos_read = ttl.copy(cos[row : row + 1, 0:head_tiles], c)
                        sin_read = ttl.copy(sin[row : row + 1, 0:head_tiles], s)
                        x_read.wait()
                        cos_read.wait()
                        sin_read.wait()

        @ttl.datamovement()
        def write() -> None:
            first = ttl.node(dims=1) * units_per_node
            for unit in range(first, min(first + units_per_node, units)):
                row = unit // heads
                col = unit % heads * head_tiles
                with out_dfb.wait() as o:
                    ttl.copy(o, out[row : row + 1, col : col + head_tiles]).wait()

    return ttl.operation(grid=grid)(rotary)


def run(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    head_dim: int,
    grid: tuple[int, int],
    device: Any,
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rope for host tensors ``x`` ``[rows, heads * head_dim]`` and ``cos``/``sin`` ``[rows, head_dim]``;
    ``rotation`` ``[head_dim, head_dim]``, by default ``rotation_matrix(head_dim)``."""
    rows = x.shape[0]
    out = device_tensor(torch.zeros_like(pad_rows(x)), ttnn.bfloat16, device)
    build(grid, head_dim)(
        device_tensor(pad_rows(x), ttnn.bfloat16, device),
        device_tensor(pad_rows(cos), ttnn.bfloat16, device),
        device_tensor(pad_rows(sin), ttnn.bfloat16, device),
        device_tensor(rotation_matrix(head_dim) if rotation is None else rotation, ttnn.bfloat16, device),
        out,
    )
    return host_tensor(out)[:rows]
