import pytest

from ttedge.runtime.kv_cache import BLOCK_SIZE, BlockAllocator, OutOfBlocks, blocks_needed


def test_blocks_needed_rounds_up_to_whole_blocks():
    assert [blocks_needed(n) for n in (0, 1, BLOCK_SIZE, BLOCK_SIZE + 1)] == [0, 1, 1, 2]


def test_allocation_never_hands_out_a_block_twice_and_free_returns_them():
    allocator = BlockAllocator(8)
    first = allocator.allocate(3)
    second = allocator.allocate(5)
    assert len(set(first) | set(second)) == 8
    assert allocator.num_free == 0
    with pytest.raises(OutOfBlocks, match="asked for 1"):
        allocator.allocate(1)
    allocator.free(first)
    assert allocator.num_free == 3
    assert sorted(allocator.allocate(3)) == sorted(first)


def test_tables_grow_and_shrink_with_the_token_count():
    allocator = BlockAllocator(4)
    table: list[int] = []
    allocator.grow_table(table, BLOCK_SIZE + 1)
    assert len(table) == 2
    allocator.grow_table(table, 2 * BLOCK_SIZE)
    assert len(table) == 2
    allocator.shrink_table(table, 1)
    assert len(table) == 1
    assert allocator.num_free == 3


def test_failed_growth_takes_nothing():
    allocator = BlockAllocator(2)
    table: list[int] = []
    with pytest.raises(OutOfBlocks):
        allocator.grow_table(table, 3 * BLOCK_SIZE)
    assert table == [] and allocator.num_free == 2
