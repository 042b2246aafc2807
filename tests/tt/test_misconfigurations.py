"""Mistakes a TT port makes fail here with the library's own errors, before any hardware is involved.

Mock validation (no numerics): shard specs, placements and allocations are checked for real.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ttnn

from tests.tt.support import BATCH, BLOCK_TOKENS, SMOLLM2, TILE, height_sharded, zeros

# Forty-two of them fit a Wormhole's L1 (a MiB or so per core); a Blackhole has room for three times more.
N150_L1_BANK_BYTES = 1_393_312


def width_sharded(shard_width: int, grid: ttnn.CoreGrid) -> ttnn.MemoryConfig:
    return ttnn.create_sharded_memory_config(
        (BATCH, shard_width), grid, ttnn.ShardStrategy.WIDTH, use_height_and_width_as_shard_shape=True
    )


def test_residual_shards_must_be_whole_tiles(mock_device: Callable[[str | Path], ttnn.MeshDevice]) -> None:
    device = mock_device("n150")
    residual = zeros(device, (1, 1, BATCH, SMOLLM2.hidden_size))
    # 576 = 18 tiles does not split over 8 cores: 72-column shards are not tile-sized.
    with pytest.raises(RuntimeError, match=r"Physical shard shape \(32, 72\) must be tile \{32, 32\} sized"):
        ttnn.to_memory_config(residual, width_sharded(SMOLLM2.hidden_size // 8, ttnn.CoreGrid(y=1, x=8)))


@pytest.mark.parametrize(("board", "fits"), [("p150", True), ("n150", False)])
def test_shard_grid_must_fit_the_worker_grid(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, fits: bool
) -> None:
    """18 one-tile shards on a 9 x 2 grid: fine on a Blackhole (13 x 10 workers), not on a harvested
    Wormhole (8 x 8), which has no ninth column."""
    device = mock_device(board)
    residual = zeros(device, (1, 1, BATCH, SMOLLM2.hidden_size))
    placement = width_sharded(TILE, ttnn.CoreGrid(y=2, x=9))
    if fits:
        assert ttnn.to_memory_config(residual, placement).memory_config().is_sharded()
    else:
        with pytest.raises(RuntimeError, match=r"Invalid shard grid: shard core \(8, 0\) has no L1 bank"):
            ttnn.to_memory_config(residual, placement)


def test_kv_cache_for_32_users_at_full_context_does_not_fit_in_l1(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    device = mock_device("n150")
    blocks = BATCH * SMOLLM2.max_position_embeddings // BLOCK_TOKENS
    shape = (blocks, SMOLLM2.num_kv_heads, BLOCK_TOKENS, SMOLLM2.head_dim)
    with pytest.raises(RuntimeError, match=r"Out of Memory: Not enough space to allocate \d+ B L1 buffer"):
        zeros(device, shape, memory_config=ttnn.L1_MEMORY_CONFIG)


def test_all_gather_on_a_2d_mesh_needs_a_cluster_axis(
    mock_mesh: Callable[[tuple[int, int]], ttnn.MeshDevice],
) -> None:
    mesh = mock_mesh((2, 4))
    hidden = zeros(mesh, (1, 1, BATCH, SMOLLM2.hidden_size))
    with pytest.raises(RuntimeError, match="1D fabric on a 2D mesh_device requires cluster_axis to be set"):
        ttnn.all_gather(hidden, dim=3)
    assert ttnn.all_gather(hidden, dim=3, cluster_axis=1).shape == ttnn.Shape(
        [1, 1, BATCH, 4 * SMOLLM2.hidden_size]
    )


def test_concat_heads_needs_the_batch_on_a_rectangle_of_cores(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    """32 users filled row by row into a 13-wide Blackhole grid take two full rows and six cores of a
    third: concat-heads then fails (with a bare "bad optional access" in ttnn 0.81.1). On the 8-wide
    Wormhole grid the same rule happens to give a rectangle, so only the p150 catches this."""
    device = mock_device("p150")
    ragged = ttnn.num_cores_to_corerangeset(BATCH, device.compute_with_storage_grid_size(), row_wise=True)
    assert len(ragged.ranges()) == 2
    scores = zeros(
        device,
        (1, BATCH, TILE, SMOLLM2.head_dim),
        memory_config=height_sharded((TILE, SMOLLM2.head_dim), ragged),
    )
    with pytest.raises(RuntimeError, match="bad optional access"):
        ttnn.experimental.nlp_concat_heads_decode(scores, num_heads=SMOLLM2.num_heads)
    rectangle = ttnn.to_memory_config(scores, height_sharded((TILE, SMOLLM2.head_dim)))
    assert ttnn.experimental.nlp_concat_heads_decode(
        rectangle, num_heads=SMOLLM2.num_heads
    ).shape == ttnn.Shape([1, 1, BATCH, SMOLLM2.num_heads * SMOLLM2.head_dim])


def chunked_prefill_inputs(device: ttnn.MeshDevice, blocks_per_user: int) -> tuple[ttnn.Tensor, ...]:
    """A 64-token chunk of SmolLM2's 9 query heads and a paged bfloat8_b cache of its 3 KV heads."""
    config = SMOLLM2
    q = zeros(device, (1, config.num_heads, 64, config.head_dim))
    cache = zeros(device, (8, config.num_kv_heads, BLOCK_TOKENS, config.head_dim), ttnn.bfloat8_b)
    page_table = zeros(device, (1, blocks_per_user), ttnn.int32, layout=ttnn.ROW_MAJOR_LAYOUT)
    return q, cache, page_table


def test_chunked_prefill_attention_reads_as_far_as_the_page_table_reaches(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    """A chunk attends to every position before it through the user's page table: a table of 3 blocks
    (96 tokens) cannot serve a 64-token chunk at position 64."""
    device = mock_device("n150")
    q, cache, short_table = chunked_prefill_inputs(device, blocks_per_user=3)
    with pytest.raises(
        RuntimeError, match="K's sequence length must be >= Q's sequence length \\+ chunk_start_idx"
    ):
        ttnn.transformer.chunked_scaled_dot_product_attention(q, cache, cache, short_table, 64)
    _, _, table = chunked_prefill_inputs(device, blocks_per_user=4)
    assert ttnn.transformer.chunked_scaled_dot_product_attention(q, cache, cache, table, 64).shape == q.shape


def test_chunked_prefill_attention_takes_only_scales_float32_holds_exactly(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    """ttnn 0.81.1's binding of the chunked SDPA refuses a Python float that float32 cannot hold exactly
    (head_dim 32's 32 ** -0.5 included) as "incompatible function arguments", while plain SDPA and SDPA
    decode take it; the port rounds the scale to float32 first (attention.py)."""
    device = mock_device("n150")
    q, cache, table = chunked_prefill_inputs(device, blocks_per_user=4)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ttnn.transformer.chunked_scaled_dot_product_attention(q, cache, cache, table, 64, scale=32**-0.5)
    exact = float(np.float32(32**-0.5))
    out = ttnn.transformer.chunked_scaled_dot_product_attention(q, cache, cache, table, 64, scale=exact)
    assert out.shape == q.shape
