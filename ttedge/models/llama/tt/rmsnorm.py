"""RMSNorm over the hidden dimension (tt-metal's ``models/common/rmsnorm.py``, single chip)."""

from __future__ import annotations

import numpy as np
import ttnn

from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY
from ttedge.models.llama.tt.weights import norm_weight


class RMSNorm:
    def __init__(self, mesh: ttnn.MeshDevice, rows: np.ndarray, eps: float):
        self.weight = norm_weight(mesh, rows)
        # ttnn's default epsilon is 1e-12, not the model's.
        self.eps = eps

    def __call__(self, x: ttnn.Tensor, memory_config: ttnn.MemoryConfig = ACTIVATIONS_MEMORY) -> ttnn.Tensor:
        """Decode rows stay in L1 (the default); prefill passes DRAM."""
        return ttnn.rms_norm(x, epsilon=self.eps, weight=self.weight, memory_config=memory_config)
