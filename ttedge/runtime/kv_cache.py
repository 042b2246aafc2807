"""The paged KV cache: host-side block allocator and the CPU backend's device-side memory.

Memory is handed out in blocks of ``BLOCK_SIZE`` tokens (one TT tile row), and every sequence
owns a block table: the list of blocks holding its tokens in order. Token ``t`` of a sequence lives
in slot ``block_table[t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE``. Both backends read the same
host tables; only the memory behind a slot differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 32


def blocks_needed(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free; the scheduler preempts on it."""


class BlockAllocator:
    """A free list of block ids; O(1) allocate and free."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # Popping from the end hands out low block ids first, which keeps small runs compact.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} KV blocks, {len(self._free)} free of {self.num_blocks}")
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def grow_table(self, table: list[int], num_tokens: int) -> None:
        """Extend ``table`` in place so it can hold ``num_tokens`` tokens."""
        missing = blocks_needed(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    def shrink_table(self, table: list[int], num_tokens: int) -> None:
        """Free the blocks of ``table`` past what ``num_tokens`` tokens need (after a rollback)."""
        keep = blocks_needed(num_tokens)
        if len(table) > keep:
            self.free(table[keep:])
            del table[keep:]


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BLOCK_SIZE * element


class CpuKVCache:
    """Per-layer K and V slot arrays in host memory, laid out ``[kv_heads, slots, head_dim]``.

    Heads lead so that gathering a batch's slots yields ``[kv_heads, batch, tokens, head_dim]``,
    which attention consumes after a free permute.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (spec.num_kv_heads, num_blocks * BLOCK_SIZE, spec.head_dim)
        self.keys = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.values = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block()
