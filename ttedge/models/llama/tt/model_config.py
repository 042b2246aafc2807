"""Device facts, memory placements and program configs of the port on Wormhole and Blackhole."""

from __future__ import annotations

import math
from dataclasses import dataclass

import ttnn

TILE = 32
# Decode runs one token for each of up to 32 users: the batch fills one tile row (as tt_transformers pads).
BATCH = 32
# ttedge's paged KV cache holds 32 tokens per block (one tile row); see ARCHITECTURE.md.
BLOCK_TOKENS = 32


@dataclass(frozen=True)
class DeviceSpec:
    """What the port needs to know about the chip: worker grid and DRAM banks.

    Wormhole (n150) has an 8 x 8 worker grid and 12 DRAM banks, Blackhole (p150) 13 x 10 and 8; they are
    read from the opened device rather than assumed.
    """

    arch: ttnn.device.Arch
    grid_x: int
    grid_y: int
    dram_banks: int

    @classmethod
    def of(cls, mesh: ttnn.MeshDevice) -> DeviceSpec:
        grid = mesh.compute_with_storage_grid_size()
        dram = mesh.dram_grid_size()
        return cls(arch=mesh.arch(), grid_x=grid.x, grid_y=grid.y, dram_banks=dram.x * dram.y)

    @property
    def batch_grid(self) -> ttnn.CoreGrid:
        """One core per decode user, as a rectangle: concat-heads refuses a batch spread over a ragged set
        of cores (Blackhole's 13-wide grid filled row by row is ragged; see docs/tt-validation.md)."""
        return ttnn.CoreGrid(y=BATCH // 8, x=8)

    def height_sharded(self, shard: tuple[int, int]) -> ttnn.MemoryConfig:
        """L1 height-sharded placement with one `shard` per decode user, in row-major core order."""
        return ttnn.create_sharded_memory_config(
            shard,
            self.batch_grid,
            ttnn.ShardStrategy.HEIGHT,
            ttnn.ShardOrientation.ROW_MAJOR,
            use_height_and_width_as_shard_shape=True,
        )

    def dram_sharded_weight(self, k: int, n: int) -> ttnn.MemoryConfig:
        """A ``[k, n]`` weight width-sharded over every DRAM bank, so a decode matmul streams all banks at
        once (12 on Wormhole, 8 on Blackhole). Shards are whole tiles; the last banks may hold less."""
        shard_width = math.ceil(n / (TILE * self.dram_banks)) * TILE
        banks = ttnn.CoreRangeSet(
            {ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(self.dram_banks - 1, 0))}
        )
        shard = ttnn.ShardSpec(banks, (k, shard_width), ttnn.ShardOrientation.ROW_MAJOR)
        return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.DRAM, shard)

    def input_grid(self, k: int) -> ttnn.CoreGrid:
        """Cores a DRAM-sharded matmul's ``k``-wide input is split over: a divisor of ``k``'s tiles, as close
        to 32 cores as the worker grid allows (tt_transformers' ``find_grid``); 576 = 18 tiles gets 18."""
        tiles = k // TILE
        by_closeness = sorted(
            (c for c in range(1, min(tiles, self.grid_x * self.grid_y) + 1) if tiles % c == 0),
            key=lambda c: abs(c - 32),
        )
        for cores in by_closeness:
            for rows in range(1, self.grid_y + 1):
                if cores % rows == 0 and cores // rows <= self.grid_x:
                    return ttnn.CoreGrid(y=rows, x=cores // rows)
        raise AssertionError("one core always fits")

    def width_sharded_input(self, k: int) -> ttnn.MemoryConfig:
        grid = self.input_grid(k)
        return ttnn.create_sharded_memory_config(
            (BATCH, k // grid.num_cores),
            grid,
            ttnn.ShardStrategy.WIDTH,
            ttnn.ShardOrientation.ROW_MAJOR,
            use_height_and_width_as_shard_shape=True,
        )

    def dram_matmul_program(
        self, k: int, n: int
    ) -> ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig:
        cores = self.input_grid(k).num_cores
        return ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
            in0_block_w=math.ceil(k / (TILE * cores)),
            per_core_M=BATCH // TILE,
            per_core_N=math.ceil(n / (TILE * cores)),
            fused_activation=None,
        )

    def prefill_matmul_program(
        self, seq_len: int, k: int, n: int
    ) -> ttnn.MatmulMultiCoreReuseMultiCastProgramConfig:
        """A 2-D multicast matmul of ``seq_len`` rows by a ``[k, n]`` weight, DRAM interleaved in and out
        (tt_transformers' prefill configs): rows split over the grid's height, columns over its width, each
        by the largest count of cores that divides its tiles, so every core gets whole, equal blocks."""
        m_tiles, k_tiles, n_tiles = seq_len // TILE, k // TILE, math.ceil(n / TILE)
        rows = _largest_divisor(m_tiles, self.grid_y)
        cols = _largest_divisor(n_tiles, self.grid_x)
        per_core_n = n_tiles // cols
        return ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(
            compute_with_storage_grid_size=ttnn.CoreCoord(cols, rows),
            # Up to 4 tiles of the inner dimension per step: larger steps only grow the circular buffers.
            in0_block_w=_largest_divisor(k_tiles, 4),
            out_subblock_h=1,
            # A destination-register block holds at most 4 tiles (with fp32 accumulation off).
            out_subblock_w=_largest_divisor(per_core_n, 4),
            per_core_M=m_tiles // rows,
            per_core_N=per_core_n,
            transpose_mcast=False,
            fused_activation=None,
            fuse_batch=True,
        )

    def sdpa_prefill_program(self, seq_len: int, chunk_start: int) -> ttnn.SDPAProgramConfig:
        """Prefill attention's program config over the whole worker grid. Q and K are processed in chunks
        that must divide the (tile-padded) sequence and, for a chunk starting deeper into the cache, its
        start too (the library's check; tt_transformers picks ``chunk_start & -chunk_start``). Longer
        chunks pay off from 2048 tokens on (tt_transformers' empirical choice)."""
        cap = 256 if seq_len >= 2048 else 64
        chunk = TILE
        while chunk * 2 <= cap and seq_len % (chunk * 2) == 0 and chunk_start % (chunk * 2) == 0:
            chunk *= 2
        return ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=ttnn.CoreCoord(self.grid_x, self.grid_y),
            q_chunk_size=chunk,
            k_chunk_size=chunk,
            exp_approx_mode=False,
        )


def _largest_divisor(n: int, cap: int) -> int:
    return next(d for d in range(min(n, cap), 0, -1) if n % d == 0)


# Norm, embedding and LM head weights and KV caches live in DRAM interleaved (the projections are
# DRAM-sharded, see linear.py); the decode residual stream (32 x hidden) is small enough for L1.
WEIGHTS_MEMORY = ttnn.DRAM_MEMORY_CONFIG
ACTIVATIONS_MEMORY = ttnn.L1_MEMORY_CONFIG
# Prefill activations grow with the prompt (a 1024-token SmolLM2 QKV output alone is 1.9 MB): DRAM.
PREFILL_MEMORY = ttnn.DRAM_MEMORY_CONFIG
# The longest run of tokens one prefill forward takes; longer prompts go in chunks, each attending to the
# cache the earlier ones filled. tt_transformers splits its prefill matmuls above 1024 rows too.
MAX_PREFILL_TOKENS = 1024
