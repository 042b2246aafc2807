"""One pre-norm decoder block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``; on a mesh the attention's
and the MLP's outputs are each chip's part of the update, all-reduced before the residual add."""

from __future__ import annotations

import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.attention import Attention, DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.mlp import MLP
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.tensor_parallel import TensorParallel, single_chip
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
        tp: TensorParallel | None = None,
    ):
        """``tp``: the tensor-parallel plan the weights were split by (default: one chip)."""
        self.tp = tp or single_chip(config)
        self.attn_norm = RMSNorm(mesh, layer.attn_norm, config.rms_norm_eps)
        self.attention = Attention(
            mesh, spec, config, layer, kv_dtype, num_blocks, self.tp, rotary_kernel=kernels.rotary
        )
        # The residual add after attention and the MLP's norm: one TT-Lang kernel in decode when chosen.
        self.mlp_norm = ResidualNorm(mesh, layer.mlp_norm, config.rms_norm_eps, kernels.residual_rmsnorm)
        self.mlp = MLP(mesh, spec, layer, kernels.swiglu)

    def __call__(self, x: ttnn.Tensor, step: DecodeInputs) -> ttnn.Tensor:
        attended = self.tp.all_reduce(self.attention(self.attn_norm(x), step), ACTIVATIONS_MEMORY)
        h, normed = self.mlp_norm(x, attended)
        update = self.tp.all_reduce(self.mlp(normed), ACTIVATIONS_MEMORY)
        return ttnn.add(h, update, memory_config=ACTIVATIONS_MEMORY)

    def prefill(self, x: ttnn.Tensor, step: PrefillInputs) -> ttnn.Tensor:
        attended = self.attention.prefill(self.attn_norm(x, PREFILL_MEMORY), step)
        h = ttnn.add(x, self.tp.all_reduce(attended, PREFILL_MEMORY), memory_config=PREFILL_MEMORY)
        normed = self.mlp_norm.norm(h, PREFILL_MEMORY)
        update = self.tp.all_reduce(self.mlp.prefill(normed), PREFILL_MEMORY)
        return ttnn.add(h, update, memory_config=PREFILL_MEMORY)
