"""The LM head: final hidden states to logits over the (tile-padded) vocabulary."""

from __future__ import annotations

import numpy as np
import ttnn

from ttedge.models.llama.tt.weights import LM_HEAD_DTYPE, device_weight


class LMHead:
    def __init__(self, mesh: ttnn.MeshDevice, weight: np.ndarray):
        self.weight = device_weight(mesh, weight, LM_HEAD_DTYPE)

    def __call__(self, x: ttnn.Tensor) -> ttnn.Tensor:
        # 32 x vocab logits (3 MB in bfloat16 at a 49k vocabulary) go to DRAM, not L1.
        return ttnn.linear(x, self.weight, memory_config=ttnn.DRAM_MEMORY_CONFIG)
