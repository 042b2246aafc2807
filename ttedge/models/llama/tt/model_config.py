"""Device facts and memory placements the decode port uses on Wormhole and Blackhole."""

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


# Norm, embedding and LM head weights and KV caches live in DRAM interleaved (the projections are
# DRAM-sharded, see linear.py); the decode residual stream (32 x hidden) is small enough for L1.
WEIGHTS_MEMORY = ttnn.DRAM_MEMORY_CONFIG
ACTIVATIONS_MEMORY = ttnn.L1_MEMORY_CONFIG
