"""TT-Lang kernels in the port, behind the ``ttlang_kernels`` flag of ``Transformer``: the decode layer's
residual add + RMSNorm (``ttedge.kernels.residual_rmsnorm``, one fused op), SiLU-and-multiply
(``ttedge.kernels.swiglu``), decode's rotary embedding of Q and K (``ttedge.kernels.rotary``) and greedy
draft acceptance (``ttedge.kernels.speculative_acceptance``) where tt-lang, the TT-Lang compiler, is
installed; ttnn's ops otherwise. The choice and its reason are logged once per model.

What cannot be checked in this repository: tt-lang 1.1.1 pins ttnn 0.69.0 and the port pins 0.81.1, so no
environment here holds both, and there is no card. The TT tier runs the flag and the ttnn fallback on mock
clusters; the kernels themselves run in the simulator (tests/kernels) and, on a card with tt-lang, in
``tests/kernels/test_hardware.py``. The kernel branches below are what a card would run: here only their
ttnn ops run, on the mock with stand-ins for the kernels (tests/tt/test_ttlang_flag.py).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.kernels.footprint import residual_rmsnorm_l1_bytes
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, TILE, WEIGHTS_MEMORY
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.rope import RotaryInputs
from ttedge.models.llama.tt.rope_tables import head_rotation
from ttedge.models.llama.tt.weights import device_tensor
from ttedge.perf.hardware import CARDS

log = logging.getLogger(__name__)

# Every card TT-Lang targets leaves it the same L1 for dataflow buffers (ttedge.perf.hardware).
_DATAFLOW_BUFFER_BUDGET = min(card.dataflow_buffer_budget_bytes for card in CARDS.values())


@dataclass(frozen=True)
class KernelChoice:
    """Which decode ops run as TT-Lang kernels, and why."""

    residual_rmsnorm: bool
    swiglu: bool
    rotary: bool
    speculative_acceptance: bool
    reason: str

    def describe(self) -> str:
        ops = {
            "residual+RMSNorm": self.residual_rmsnorm,
            "SwiGLU": self.swiglu,
            "rotary": self.rotary,
            "draft acceptance": self.speculative_acceptance,
        }
        chosen = ", ".join(f"{name}: {'TT-Lang kernel' if on else 'ttnn'}" for name, on in ops.items())
        return f"{chosen} ({self.reason})"


def ttnn_only(reason: str) -> KernelChoice:
    return KernelChoice(False, False, False, False, reason)


TTNN_ONLY = ttnn_only("ttlang_kernels is off")


def missing_compiler() -> str | None:
    """Why the TT-Lang kernels cannot be compiled here, or None when tt-lang is installed."""
    if importlib.util.find_spec("ttl") is None:
        return "tt-lang is not installed"
    import ttl

    if ttl._SIM_ONLY_INSTALL:
        return "only tt-lang-sim (the simulator) is installed, not tt-lang (the compiler)"
    return None


def choose_kernels(requested: bool, config: ModelConfig) -> KernelChoice:
    """The ops ``Transformer`` runs as TT-Lang kernels: none unless ``requested`` and tt-lang is installed;
    the fused norm only while a tile row of the hidden size fits a core's L1 with its buffers."""
    if not requested:
        choice = TTNN_ONLY
    elif (missing := missing_compiler()) is not None:
        choice = ttnn_only(f"ttlang_kernels requested, but {missing}: ttnn ops instead")
    else:
        norm_bytes = residual_rmsnorm_l1_bytes(config.hidden_size)
        fits = norm_bytes <= _DATAFLOW_BUFFER_BUDGET
        reason = "ttlang_kernels on" + (
            ""
            if fits
            else f"; the fused norm needs {norm_bytes} B of L1 per core at hidden {config.hidden_size}, "
            f"over the {_DATAFLOW_BUFFER_BUDGET} B budget"
        )
        choice = KernelChoice(
            residual_rmsnorm=fits, swiglu=True, rotary=True, speculative_acceptance=True, reason=reason
        )
    log.info("TT port ops: %s", choice.describe())
    return choice


def _grid(mesh: ttnn.MeshDevice) -> tuple[int, int]:
    grid = mesh.compute_with_storage_grid_size()
    return (grid.y, grid.x)


def _as_rows(x: ttnn.Tensor) -> ttnn.Tensor:
    """``[..., rows, width]`` as the ``[all rows, width]`` tile grid the kernels index."""
    return ttnn.reshape(x, (math.prod(x.shape) // x.shape[-1], x.shape[-1]))


class ResidualNorm:
    """``h = x + update`` and ``rms_norm(h)``: the decode layer's residual add and the norm after it."""

    def __init__(self, mesh: ttnn.MeshDevice, weight: ttnn.Tensor, eps: float, fused: bool):
        """``weight``: the norm's converted host tensor, as ``RMSNorm`` takes it."""
        self.norm = RMSNorm(mesh, weight, eps)
        self.fused: Any = None
        if fused:
            from ttedge.kernels import residual_rmsnorm

            self.fused = residual_rmsnorm.build(_grid(mesh), eps)
            # The kernel reads the weight as a tile row: the norm weight repeated on all 32 rows.
            # ttnn 0.81.1's to_numpy of a bfloat16 tensor holds no numbers numpy can cast: float32 first.
            rows = ttnn.to_dtype(weight, ttnn.float32).to_numpy().reshape(1, -1)
            tile_row = np.ascontiguousarray(np.broadcast_to(rows, (TILE, rows.size)))
            self.weight_rows = _as_rows(device_tensor(mesh, tile_row, ttnn.bfloat16, WEIGHTS_MEMORY))

    def __call__(self, x: ttnn.Tensor, update: ttnn.Tensor) -> tuple[ttnn.Tensor, ttnn.Tensor]:
        if self.fused is None:
            h = ttnn.add(x, update, memory_config=ACTIVATIONS_MEMORY)
            return h, self.norm(h)
        h, normed = ttnn.zeros_like(x), ttnn.zeros_like(x)
        self.fused(_as_rows(x), _as_rows(update), self.weight_rows, _as_rows(h), _as_rows(normed))
        return h, normed


class SiluMultiply:
    """``silu(gate) * up`` on the decode MLP's width-sharded gate and up projections."""

    def __init__(self, mesh: ttnn.MeshDevice, kernel: bool):
        self.kernel: Any = None
        if kernel:
            from ttedge.kernels import swiglu

            self.kernel = swiglu.build(_grid(mesh))

    def __call__(self, gate: ttnn.Tensor, up: ttnn.Tensor) -> ttnn.Tensor:
        if self.kernel is None:
            # Gate and up come back sharded alike, so the multiply runs shard by shard; SiLU rides on its
            # first input instead of costing an op of its own.
            return ttnn.mul(
                gate,
                up,
                input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
                memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG,
            )
        # The kernel reads interleaved tiles; the down projection re-shards its input itself.
        gate = ttnn.sharded_to_interleaved(gate, ACTIVATIONS_MEMORY)
        up = ttnn.sharded_to_interleaved(up, ACTIVATIONS_MEMORY)
        out = ttnn.zeros_like(gate)
        self.kernel(_as_rows(gate), _as_rows(up), _as_rows(out))
        return out


class Rotary:
    """Decode's rotary embedding of Q and K heads ``[1, users, heads, head_dim]`` (one user per core,
    height-sharded, each user's heads padded to a tile): ``rotary_embedding_llama``, or the TT-Lang
    ``rotary`` kernel given the same inputs.

    The kernel computes ``x * cos + (x @ R) * sin`` per head with a ``[head_dim, head_dim]`` ``R``: with
    ``R = head_rotation(head_dim)`` (the port's trans_mat on each tile of a head) and the port's Meta-order
    cos/sin it is ``rotary_embedding_llama`` on the permuted weights (tests/kernels/test_rotary_meta_order.py
    checks it against the torch reference). The kernel takes the heads as a ``[users * heads, head_dim]``
    grid, row ``u * heads + h`` for head ``h`` of user ``u``, with a table row per row of it: each user's
    decode cos/sin tile repeats its position on all 32 rows (``RotarySetup.decode_cos_sin``), so its first
    ``heads`` rows, in user order, are those rows.

    Prefill keeps ``rotary_embedding_llama``: there Q is ``[1, heads, seq_len, head_dim]`` with one cos/sin
    row per position broadcast over the heads, which the kernel's layout (a table row per row of ``x``) would
    have to repeat per head in DRAM -- as with the other kernels, decode first.
    """

    def __init__(self, mesh: ttnn.MeshDevice, head_dim: int, kernel: bool):
        self.kernel: Any = None
        if kernel:
            from ttedge.kernels import rotary

            self.kernel = rotary.build(_grid(mesh), head_dim)
            self.rotation = _as_rows(
                device_tensor(mesh, head_rotation(head_dim), ttnn.bfloat16, WEIGHTS_MEMORY)
            )

    def __call__(self, q: ttnn.Tensor, k: ttnn.Tensor, rot: RotaryInputs) -> tuple[ttnn.Tensor, ttnn.Tensor]:
        if self.kernel is None:
            return (
                ttnn.experimental.rotary_embedding_llama(
                    q, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=True
                ),
                ttnn.experimental.rotary_embedding_llama(
                    k, rot.cos, rot.sin, rot.trans_mat, is_decode_mode=True
                ),
            )
        # The kernel reads interleaved tiles; the tables are converted once for Q and K.
        cos = ttnn.sharded_to_interleaved(rot.cos, ACTIVATIONS_MEMORY)
        sin = ttnn.sharded_to_interleaved(rot.sin, ACTIVATIONS_MEMORY)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, heads: ttnn.Tensor, cos: ttnn.Tensor, sin: ttnn.Tensor) -> ttnn.Tensor:
        _, users, count, head_dim = heads.shape

        def per_head(table: ttnn.Tensor) -> ttnn.Tensor:
            return _as_rows(ttnn.slice(table, (0, 0, 0, 0), (1, users, count, head_dim)))

        x = _as_rows(ttnn.sharded_to_interleaved(heads, ACTIVATIONS_MEMORY))
        # The kernel writes ``out`` itself: a reshape of a tile tensor may be a copy, so not of a 4-D one.
        out = ttnn.zeros_like(x)
        self.kernel(x, per_head(cos), per_head(sin), self.rotation, out)
        # Back to one user per core, as the cache update and SDPA decode read Q and K.
        return ttnn.interleaved_to_sharded(ttnn.reshape(out, heads.shape), heads.memory_config())


class AcceptedLengths:
    """Greedy draft acceptance on the device: per row, how many leading drafts equal the target's argmax.

    ``draft`` and ``target`` are float32 ``[rows, cols]`` tile grids of token ids (exact below 2**24), a row
    per verifying sequence; a column that must not match holds ``DRAFT_PAD`` in ``draft`` (token ids are
    never negative), the bonus token's column included. Returns float32 ``[rows, 1]``. The TT-Lang
    ``speculative_acceptance`` kernel, or the same three steps in ttnn ops: ``ne``, the prefix count as a
    matmul with the upper-triangular ones (a column-by-column scan in one op), ``eq`` 0 and a row sum.
    """

    DRAFT_PAD = -1.0

    def __init__(self, mesh: ttnn.MeshDevice, kernel: bool):
        self.mesh = mesh
        self.uppers: dict[int, ttnn.Tensor] = {}  # by column count: every step has a tile's worth or two
        self.kernel: Any = None
        if kernel:
            from ttedge.kernels import speculative_acceptance

            self.kernel = speculative_acceptance.build(_grid(mesh))

    def _upper(self, cols: int) -> ttnn.Tensor:
        if cols not in self.uppers:
            ones = np.triu(np.ones((cols, cols), np.float32))
            self.uppers[cols] = _as_rows(device_tensor(self.mesh, ones, ttnn.float32, ACTIVATIONS_MEMORY))
        return self.uppers[cols]

    def __call__(self, draft: ttnn.Tensor, target: ttnn.Tensor) -> ttnn.Tensor:
        upper = self._upper(draft.shape[-1])
        if self.kernel is None:
            rejected_so_far = ttnn.matmul(ttnn.ne(draft, target), upper)
            return ttnn.sum(ttnn.eq(rejected_so_far, 0.0), dim=-1, keepdim=True)
        # The kernel writes each row's count to column 0 of one tile column.
        out = ttnn.zeros(
            (draft.shape[0], TILE), ttnn.float32, ttnn.TILE_LAYOUT, self.mesh, ACTIVATIONS_MEMORY
        )
        self.kernel(draft, target, upper, out)
        return ttnn.slice(out, (0, 0), (draft.shape[0], 1))
