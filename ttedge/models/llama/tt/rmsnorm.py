"""RMSNorm over the hidden dimension (tt-metal's ``models/common/rmsnorm.py``, single chip)."""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, WEIGHTS_MEMORY


class RMSNorm:
    def __init__(self, mesh: ttnn.MeshDevice, weight: ttnn.Tensor, eps: float):
        """``weight``: the converted host tensor, bfloat16 rows one tile wide as ``ttnn.rms_norm`` reads."""
        self.weight = weight.to(mesh, WEIGHTS_MEMORY)
        # ttnn's default epsilon is 1e-12, not the model's.
        self.eps = eps

    def __call__(self, x: ttnn.Tensor, memory_config: ttnn.MemoryConfig = ACTIVATIONS_MEMORY) -> ttnn.Tensor:
        """Decode rows stay in L1 (the default); prefill passes DRAM."""
        return ttnn.rms_norm(x, epsilon=self.eps, weight=self.weight, memory_config=memory_config)
