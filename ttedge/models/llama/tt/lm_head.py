"""The LM head: final hidden states to logits over the (tile-padded) vocabulary; on a mesh each chip holds a
slice of the vocabulary, and the logits are all-gathered so every chip holds them whole (the host reads
one chip's copy, and greedy decoding takes the argmax on the device, as on one chip)."""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.model_config import WEIGHTS_MEMORY
from ttedge.models.llama.tt.tensor_parallel import TensorParallel


class LMHead:
    def __init__(self, mesh: ttnn.MeshDevice, weight: ttnn.Tensor, tp: TensorParallel | None = None):
        """``weight`` is the converted host tensor ``[1, 1, hidden, padded vocab]`` (on a mesh, each chip's
        slice of the padded vocabulary); ``tp`` the plan it was split by (default: one chip)."""
        self.weight = weight.to(mesh, WEIGHTS_MEMORY)
        self.tp = tp

    def __call__(self, x: ttnn.Tensor) -> ttnn.Tensor:
        # 32 x vocab logits (3 MB in bfloat16 at a 49k vocabulary) go to DRAM, not L1.
        logits = ttnn.linear(x, self.weight, memory_config=ttnn.DRAM_MEMORY_CONFIG)
        if self.tp is None:
            return logits
        return self.tp.all_gather(logits, dim=3, memory_config=ttnn.DRAM_MEMORY_CONFIG)
