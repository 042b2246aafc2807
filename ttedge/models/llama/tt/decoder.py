"""One pre-norm decoder block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

from __future__ import annotations

import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.attention import Attention, DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.mlp import MLP
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.ttlang import TTNN_ONLY, KernelChoice, ResidualNorm
from ttedge.models.llama.tt.weights import LayerTensors


class DecoderLayer:
    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        spec: DeviceSpec,
        config: ModelConfig,
        layer: LayerTensors,
        kv_dtype: ttnn.DataType,
        num_blocks: int,
        kernels: KernelChoice = TTNN_ONLY,
    ):
        self.attn_norm = RMSNorm(mesh, layer.attn_norm, config.rms_norm_eps)
        self.attention = Attention(mesh, spec, config, layer, kv_dtype, num_blocks, kernels.rotary)
        # The residual add after attention and the MLP's norm: one TT-Lang kernel in decode when chosen.
        self.mlp_norm = ResidualNorm(mesh, layer.mlp_norm, config.rms_norm_eps, kernels.residual_rmsnorm)
        self.mlp = MLP(mesh, spec, layer, kernels.swiglu)

    def __call__(self, x: ttnn.Tensor, step: DecodeInputs) -> ttnn.Tensor:
        h, normed = self.mlp_norm(x, self.attention(self.attn_norm(x), step))
        return ttnn.add(h, self.mlp(normed), memory_config=ACTIVATIONS_MEMORY)

    def prefill(self, x: ttnn.Tensor, step: PrefillInputs) -> ttnn.Tensor:
        h = ttnn.add(
            x, self.attention.prefill(self.attn_norm(x, PREFILL_MEMORY), step), memory_config=PREFILL_MEMORY
        )
        normed = self.mlp_norm.norm(h, PREFILL_MEMORY)
        return ttnn.add(h, self.mlp.prefill(normed), memory_config=PREFILL_MEMORY)
