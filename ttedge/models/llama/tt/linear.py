"""Projections over DRAM-sharded weights, tt_transformers' layout on one chip.

Decode multiplies 32 rows by a whole weight matrix: the time is reading the weight. Width-sharding it
over every DRAM bank, each bank read by its nearest worker, uses all of the chip's DRAM bandwidth.
The decode input must be L1 width-sharded over the grid the program config names; the output comes back
L1 width-sharded on the DRAM readers' cores.

Prefill multiplies a whole prompt by the same weight (one copy serves both modes, as in
tt_transformers): a 2-D multicast matmul with DRAM interleaved activations in and out.
"""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.model_config import PREFILL_MEMORY, DeviceSpec


class DramShardedLinear:
    def __init__(self, mesh: ttnn.MeshDevice, spec: DeviceSpec, weight: ttnn.Tensor):
        """``weight`` is a converted host tensor ``[1, 1, k, n]`` (``weights.LayerTensors``)."""
        k, n = weight.shape[-2], weight.shape[-1]
        self.spec, self.k, self.n = spec, k, n
        self.weight = weight.to(mesh, spec.dram_sharded_weight(k, n))
        self.input_memory = spec.width_sharded_input(k)
        self.program = spec.dram_matmul_program(k, n)

    def __call__(self, x: ttnn.Tensor) -> ttnn.Tensor:
        return ttnn.linear(
            ttnn.to_memory_config(x, self.input_memory),
            self.weight,
            program_config=self.program,
            memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG,
        )

    def prefill(self, x: ttnn.Tensor) -> ttnn.Tensor:
        """``x`` is ``[1, 1, seq_len, k]`` in DRAM, ``seq_len`` a multiple of 32 up to MAX_PREFILL_TOKENS."""
        return ttnn.linear(
            x,
            self.weight,
            program_config=self.spec.prefill_matmul_program(x.shape[-2], self.k, self.n),
            memory_config=PREFILL_MEMORY,
        )
