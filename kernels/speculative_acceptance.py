"""Greedy speculative acceptance on the device: per sequence, how many leading draft tokens equal the target
model's argmax at the same position. Only that count (one tile column for 32 sequences) needs to cross PCIe,
instead of the target's argmax rows or logits.

``draft`` is ``[rows, k_cols]`` and ``target`` ``[rows, >= k_cols]`` (the target's argmax has ``k + 1``
columns: its last, the bonus token, is never compared), token ids as float32, which holds every id below
2**24 exactly; the host pads ``draft`` with ``DRAFT_PAD`` and ``target`` with ``TARGET_PAD``, so a padded
column never matches and ends every prefix. ``upper`` is the ``[k_cols, k_cols]`` upper-triangular matrix of
ones (``upper_triangular``). Per tile row of 32 sequences:

    mismatch = draft != target                      (1 where a draft is rejected)
    rejected_so_far = mismatch @ upper              (column j: rejections at positions 0..j)
    accepted = sum over j of (rejected_so_far == 0) (the length of the matching prefix)

The count lands in column 0 of ``out`` ``[rows, 32]``. The matmul makes the prefix scan one matrix-engine op
instead of a column-by-column loop. Tile rows are dealt out over the grid's nodes.
"""

from __future__ import annotations

from typing import Any

import torch

from ttedge.kernels.dsl import FLOAT32_TILE_BYTES, TILE, device_tensor, host_tensor, pad_rows, ttl, ttnn

DRAFT_PAD = -1.0
TARGET_PAD = -2.0

TILE_BYTES = FLOAT32_TILE_BYTES  # every tensor of this kernel is float32 (token ids exact below 2**24)


def upper_triangular(columns: int) -> torch.Tensor:
    """``U[i, j] = 1`` where ``i <= j``: ``m @ U`` sums each row of ``m`` up to and including column j."""
    return torch.triu(torch.ones(columns, columns))


def build(grid: tuple[int, int]) -> Any:
    """The operation ``(draft, target, upper, out) -> None`` on ``grid``."""

    def speculative_acceptance(draft: Any, target: Any, upper: Any, out: Any) -> None:
        row_tiles = draft.shape[0] // TILE
        k_tiles = draft.shape[1] // TILE
        rows_per_node = -(-row_tiles // ttl.grid_size(dims=1))
        draft_block = (1, k_tiles)

        draft_dfb = ttl.make_dataflow_buffer_like(draft, shape=draft_block, block_count=2)
        target_dfb = ttl.make_dataflow_buffer_like(target, shape=draft_block, block_count=2)
        upper_dfb = ttl.make_dataflow_buffer_like(upper, shape=(k_tiles, k_tiles), block_count=1)
        mismatch_dfb = ttl.make_dataflow_buffer_like(draft, shape=draft_block, block_count=1)
        rejected_dfb = ttl.make_dataflow_buffer_like(draft, shape=draft_block, block_count=1)
        in_prefix_dfb = ttl.make_dataflow_buffer_like(draft, shape=draft_block, block_count=1)
        out_dfb = ttl.make_dataflow_buffer_like(out, shape=(1, 1), block_count=2)

        @ttl.compute()
        def compute() -> None:
            first = ttl.node(dims=1) * rows_per_node
            if first < row_tiles:
                with upper_dfb.wait() as triangle:
                    for _ in range(first, min(first + rows_per_node, row_tiles)):
                        with draft_dfb.wait() as d, target_dfb.wait() as t, mismatch_dfb.reserve() as m:
                            m.store(ttl.math.ne(d, t))
                        with mismatch_dfb.wait() as m, rejected_dfb.reserve() as rejected:
                            rejected.store(m @ triangle)
                        with rejected_dfb.wait() as rejected, in_prefix_dfb.reserve() as in_prefix:
                            in_prefix.store(ttl.math.eq(rejected, ttl.block.fill(0.0, shape=draft_block)))
                        with in_prefix_dfb.wait() as in_prefix, out_dfb.reserve() as accepted:
                            accepted.store(ttl.math.reduce_sum(in_prefix, dims=[1], shape=(1, 1)))

        @ttl.datamovement()
        def read() -> None:
            first = ttl.node(dims=1) * rows_per_node
            # A node past the last row (more nodes than rows) reads nothing: a buffer waited on must be
            # consumed.
            if first < row_tiles:
                with upper_dfb.reserve() as triangle:
                    ttl.copy(upper[0:k_tiles, 0:k_tiles], triangle).wait()
                for row in range(first, min(first + rows_per_node, row_tiles)):
                    with draft_dfb.reserve() as d, target_dfb.reserve() as t:
                        draft_read = ttl.copy(draft[row : row + 1, 0:k_tiles], d)
                        target_read = ttl.copy(target[row : row + 1, 0:k_tiles], t)
                        draft_read.wait()
                        target_read.wait()

        @ttl.datamovement()
        def write() -> None:
            first = ttl.node(dims=1) * rows_per_node
            for row in range(first, min(first + rows_per_node, row_tiles)):
                with out_dfb.wait() as accepted:
                    ttl.copy(accepted, out[row : row + 1, 0:1]).wait()

    return ttl.operation(grid=grid)(speculative_acceptance)


def run(
    draft: torch.Tensor, target_argmax: torch.Tensor, *, grid: tuple[int, int], device: Any
) -> torch.Tensor:
    """Accepted lengths ``[batch]`` (int64) for ``draft`` ``[batch, k]`` and ``target_argmax``
    ``[batch, k + 1]`` (integer token ids)."""
    batch, k = draft.shape
    if target_argmax.shape != (batch, k + 1):
        raise ValueError(f"drafts {tuple(draft.shape)} need target argmax [{batch}, {k + 1}]")
    if max(int(draft.max()), int(target_argmax.max())) >= 2**24:
        raise ValueError("token ids must be below 2**24 to be exact in float32")
    k_cols = -(-k // TILE) * TILE
    target_cols = -(-(k + 1) // TILE) * TILE

    def padded(ids: torch.Tensor, cols: int, fill: float) -> torch.Tensor:
        host = torch.full((ids.shape[0], cols), fill)
        host[:, : ids.shape[1]] = ids.float()
        return pad_rows(host, fill)

    out = device_tensor(torch.zeros(pad_rows(draft).shape[0], TILE), ttnn.float32, device)
    build(grid)(
        device_tensor(padded(draft, k_cols, DRAFT_PAD), ttnn.float32, device),
        device_tensor(padded(target_argmax, target_cols, TARGET_PAD), ttnn.float32, device),
        device_tensor(upper_triangular(k_cols), ttnn.float32, device),
        out,
    )
    return host_tensor(out)[:batch, 0].round().long()
