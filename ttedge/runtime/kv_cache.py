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
    """Each layer's keys and values in one host tensor, ``[2, kv_heads, blocks, BLOCK_SIZE, head_dim]``.

    A block of one head is a contiguous 4 KB row (bfloat16, head_dim 64), so reading a batch's context
    is a single ``index_select`` of whole rows for keys and values together, 3-5x faster than
    gathering token by token, and it yields ``[kv_heads, batch, tokens, head_dim]``, which attention
    takes after a free permute.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (2, spec.num_kv_heads, num_blocks, BLOCK_SIZE, spec.head_dim)
        self.layers = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block()

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys`` and ``values`` ``[tokens, kv_heads, head_dim]`` at ``slots`` ``[tokens]``."""
        by_slot = self.layers[layer].view(2, self.spec.num_kv_heads, -1, self.spec.head_dim)
        by_slot[0].index_copy_(1, slots, keys.transpose(0, 1))
        by_slot[1].index_copy_(1, slots, values.transpose(0, 1))

    def block_rows(self, block_tables: torch.Tensor) -> torch.Tensor:
        """The rows ``read`` selects for ``block_tables`` ``[batch, blocks]``: built once per step, shared
        by every layer."""
        first_row = torch.arange(2 * self.spec.num_kv_heads)[:, None, None] * self.num_blocks
        return (first_row + block_tables[None]).flatten()

    def read(
        self, layer: int, rows: torch.Tensor, num_sequences: int, context_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``context_len`` positions of each sequence, as
        ``[batch, kv_heads, context_len, head_dim]`` views of one gathered copy."""
        spec = self.spec
        blocks = self.layers[layer].view(-1, BLOCK_SIZE * spec.head_dim).index_select(0, rows)
        both = blocks.view(2, spec.num_kv_heads, num_sequences, -1, spec.head_dim)[..., :context_len, :]
        return both[0].transpose(0, 1), both[1].transpose(0, 1)
