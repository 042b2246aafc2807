"""Token embedding lookup (tt_transformers' ``embedding.py``)."""

from __future__ import annotations

import numpy as np
import ttnn

from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, BATCH
from ttedge.models.llama.tt.weights import device_weight


class Embedding:
    def __init__(self, mesh: ttnn.MeshDevice, table: np.ndarray):
        # Row-major bfloat16: the lookup gathers whole rows, which block-float tiles do not store.
        self.weight = device_weight(mesh, table, ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)
        self.hidden = table.shape[1]

    def __call__(self, tokens: ttnn.Tensor) -> ttnn.Tensor:
        """``[1, BATCH]`` uint32, row-major; returns the residual stream ``[1, 1, BATCH, hidden]``."""
        x = ttnn.embedding(tokens, self.weight, layout=ttnn.TILE_LAYOUT, memory_config=ACTIVATIONS_MEMORY)
        return ttnn.reshape(x, (1, 1, BATCH, self.hidden))
