"""One pre-norm decoder block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

from __future__ import annotations

import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.attention import Attention, DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.mlp import MLP
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.rmsnorm import RMSNorm
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
    ):
        self.attn_norm = RMSNorm(mesh, layer.attn_norm, config.rms_norm_eps)
        self.attention = Attention(mesh, spec, config, layer, kv_dtype, num_blocks)
        self.mlp_norm = RMSNorm(mesh, layer.mlp_norm, config.rms_norm_eps)
        self.mlp = MLP(mesh, spec, layer)

    def __call__(self, x: ttnn.Tensor, step: DecodeInputs) -> ttnn.Tensor:
        h = ttnn.add(x, self.attention(self.attn_norm(x), step), memory_config=ACTIVATIONS_MEMORY)
        return ttnn.add(h, self.mlp(self.mlp_norm(h)), memory_config=ACTIVATIONS_MEMORY)

    def prefill(self, x: ttnn.Tensor, step: PrefillInputs) -> ttnn.Tensor:
        h = ttnn.add(
            x, self.attention.prefill(self.attn_norm(x, PREFILL_MEMORY), step), memory_config=PREFILL_MEMORY
        )
        return ttnn.add(h, self.mlp.prefill(self.mlp_norm(h, PREFILL_MEMORY)), memory_config=PREFILL_MEMORY)
