"""Token embedding lookup (tt_transformers' ``embedding.py``)."""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, WEIGHTS_MEMORY


class Embedding:
    def __init__(self, mesh: ttnn.MeshDevice, table: ttnn.Tensor):
        """``table`` is the converted host tensor ``[1, 1, vocab, hidden]``, bfloat16 row-major: the lookup
        gathers whole rows, which block-float tiles do not store."""
        self.weight = table.to(mesh, WEIGHTS_MEMORY)
        self.hidden = table.shape[-1]

    def __call__(
        self, tokens: ttnn.Tensor, memory_config: ttnn.MemoryConfig = ACTIVATIONS_MEMORY
    ) -> ttnn.Tensor:
        """``[1, n]`` uint32, row-major (n = BATCH users in decode, the padded prompt in prefill); returns
        the residual stream ``[1, 1, n, hidden]``, in L1 for decode (the default) or DRAM for prefill."""
        x = ttnn.embedding(tokens, self.weight, layout=ttnn.TILE_LAYOUT, memory_config=memory_config)
        return ttnn.reshape(x, (1, 1, tokens.shape[-1], self.hidden))
