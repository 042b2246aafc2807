"""The whole decode step: embedding, every decoder layer, final norm, LM head (single chip)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.attention import DecodeInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.embedding import Embedding
from ttedge.models.llama.tt.lm_head import LMHead
from ttedge.models.llama.tt.model_config import BATCH, DeviceSpec
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.rope import RotarySetup, inverse_frequencies
from ttedge.models.llama.tt.weights import WeightDtypes, host_tensor, prepare_model


class Transformer:
    """Decode for up to ``BATCH`` users over a paged KV cache of ``num_blocks`` 32-token blocks per layer.

    The caller owns the block tables (``ttedge.runtime``): each step passes every user's page table row
    and position; unused user slots are padded (any position, any page table row of valid blocks).
    """

    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        preset: PrecisionPreset,
        num_blocks: int,
    ):
        host = prepare_model(config, tensors)
        self.mesh = mesh
        self.config = config
        spec = DeviceSpec.of(mesh)
        freq_factors = tensors.get("rope.freq_factors")
        self.rope = RotarySetup(mesh, spec, config, inverse_frequencies(config, freq_factors))
        self.embedding = Embedding(mesh, host.embed)
        self.layers = [
            DecoderLayer(mesh, spec, config, layer, WeightDtypes.from_preset(preset, i), num_blocks)
            for i, layer in enumerate(host.layers)
        ]
        self.norm = RMSNorm(mesh, host.norm, config.rms_norm_eps)
        self.lm_head = LMHead(mesh, host.lm_head)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, page_table: np.ndarray) -> ttnn.Tensor:
        """One token for each of ``BATCH`` users: ``tokens`` and ``positions`` ``[BATCH]``, ``page_table``
        ``[BATCH, blocks_per_user]``. Returns logits ``[1, 1, BATCH, padded vocab]`` on the device; columns
        from ``config.vocab_size`` on are padding."""
        if tokens.shape != (BATCH,) or positions.shape != (BATCH,) or page_table.shape[0] != BATCH:
            raise ValueError(f"decode takes exactly {BATCH} users (pad unused slots)")
        step = DecodeInputs(
            positions=host_tensor(positions, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh),
            page_table=host_tensor(page_table, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh),
            rotary=self.rope.for_positions(positions),
        )
        x = self.embedding(host_tensor(tokens[None], ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh))
        for layer in self.layers:
            x = layer(x, step)
        return self.lm_head(self.norm(x))
