"""The LM head: final hidden states to logits over the (tile-padded) vocabulary."""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.model_config import WEIGHTS_MEMORY


class LMHead:
    def __init__(self, mesh: ttnn.MeshDevice, weight: ttnn.Tensor):
        """``weight`` is the converted host tensor ``[1, 1, hidden, padded vocab]``."""
        self.weight = weight.to(mesh, WEIGHTS_MEMORY)

    def __call__(self, x: ttnn.Tensor) -> ttnn.Tensor:
        # 32 x vocab logits (3 MB in bfloat16 at a 49k vocabulary) go to DRAM, not L1.
        return ttnn.linear(x, self.weight, memory_config=ttnn.DRAM_MEMORY_CONFIG)
