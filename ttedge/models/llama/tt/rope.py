"""Rotary embedding set-up for ``rotary_embedding_llama`` in decode and prefill mode: the tables and the
transformation matrix of ``rope_tables.py`` (Meta's interleaved pair order) on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.models.llama.tt.model_config import BATCH, PREFILL_MEMORY, TILE, DeviceSpec
from ttedge.models.llama.tt.rope_tables import interleaved_cos_sin, transformation_matrix
from ttedge.models.llama.tt.weights import host_tensor


@dataclass(frozen=True)
class RotaryInputs:
    """Decode: cos/sin ``[1, BATCH, TILE, head_dim]`` one user per core; trans_mat
    ``[1, 1, BATCH * TILE, TILE]``, one copy per core. Prefill: cos/sin ``[1, 1, seq_len, head_dim]`` (one
    row per position, broadcast over heads) and one ``[1, 1, TILE, TILE]`` trans_mat, all DRAM interleaved."""

    cos: ttnn.Tensor
    sin: ttnn.Tensor
    trans_mat: ttnn.Tensor


class RotarySetup:
    """Holds the transformation matrix on the device and makes each step's cos/sin for the users' positions.

    Decode cos/sin are built on the host per step; a traced decode copies them into its persistent device
    tensors before each replay (``traced_decode.py``). tt_transformers instead keeps the whole table in DRAM
    and gathers rows on the device with ``ttnn.embedding``, which sends 32 positions over PCIe rather than
    two tables of 32 x 32 x head_dim bfloat16 (128 KiB each at head_dim 64) -- a next step.
    """

    def __init__(self, mesh: ttnn.MeshDevice, spec: DeviceSpec, config: ModelConfig, inv_freq: np.ndarray):
        self.mesh = mesh
        self.inv_freq = inv_freq
        self.head_dim = config.head_dim
        self.cos_sin_memory = spec.height_sharded((TILE, config.head_dim))
        trans = np.tile(transformation_matrix(), (BATCH, 1))
        self.trans_mat = host_tensor(trans[None, None], ttnn.bfloat16).to(
            mesh, spec.height_sharded((TILE, TILE))
        )
        self.prefill_trans_mat = host_tensor(transformation_matrix()[None, None], ttnn.bfloat16).to(
            mesh, PREFILL_MEMORY
        )

    def decode_cos_sin(self, positions: np.ndarray) -> tuple[ttnn.Tensor, ttnn.Tensor]:
        """Host tensors cos, sin ``[1, BATCH, TILE, head_dim]`` for one decode step; on the device they go to
        ``cos_sin_memory``, one user per core."""
        cos, sin = interleaved_cos_sin(self.inv_freq, positions)

        def per_user(table: np.ndarray) -> ttnn.Tensor:
            # Every row of a user's tile is a head of that user (create_qkv_heads_decode pads heads to 32).
            rows = np.broadcast_to(table[None, :, None, :], (1, BATCH, TILE, self.head_dim))
            return host_tensor(rows, ttnn.bfloat16)

        return per_user(cos), per_user(sin)

    def for_positions(self, positions: np.ndarray) -> RotaryInputs:
        cos, sin = self.decode_cos_sin(positions)
        return RotaryInputs(
            cos=cos.to(self.mesh, self.cos_sin_memory),
            sin=sin.to(self.mesh, self.cos_sin_memory),
            trans_mat=self.trans_mat,
        )

    def for_prefill(self, start: int, seq_len: int) -> RotaryInputs:
        """cos/sin of positions ``start .. start + seq_len - 1`` (padding rows included: they rotate
        padding tokens, which nothing reads)."""
        cos, sin = interleaved_cos_sin(self.inv_freq, np.arange(start, start + seq_len))

        def table(rows: np.ndarray) -> ttnn.Tensor:
            return host_tensor(rows[None, None], ttnn.bfloat16).to(self.mesh, PREFILL_MEMORY)

        return RotaryInputs(cos=table(cos), sin=table(sin), trans_mat=self.prefill_trans_mat)
