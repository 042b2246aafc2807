"""The gated MLP: ``w2(silu(w1 x) * w3 x)`` (tt_transformers' ``mlp.py``, decode and prefill, single chip)."""

from __future__ import annotations

import ttnn

from ttedge.models.llama.tt.linear import DramShardedLinear
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.ttlang import SiluMultiply
from ttedge.models.llama.tt.weights import LayerTensors


class MLP:
    def __init__(
        self, mesh: ttnn.MeshDevice, spec: DeviceSpec, layer: LayerTensors, swiglu_kernel: bool = False
    ):
        self.w1 = DramShardedLinear(mesh, spec, layer.w1)
        self.w3 = DramShardedLinear(mesh, spec, layer.w3)
        self.w2 = DramShardedLinear(mesh, spec, layer.w2)
        self.silu_multiply = SiluMultiply(mesh, swiglu_kernel)

    def __call__(self, x: ttnn.Tensor) -> ttnn.Tensor:
        gated = self.silu_multiply(self.w1(x), self.w3(x))
        return ttnn.sharded_to_interleaved(self.w2(gated), ACTIVATIONS_MEMORY)

    def prefill(self, x: ttnn.Tensor) -> ttnn.Tensor:
        """``x`` is ``[1, 1, seq_len, hidden]`` in DRAM; so are the gate, up and output."""
        gated = ttnn.mul(
            self.w1.prefill(x),
            self.w3.prefill(x),
            input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
            memory_config=PREFILL_MEMORY,
        )
        return self.w2.prefill(gated)
