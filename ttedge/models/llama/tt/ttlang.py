"""TT-Lang kernels in the port, behind the ``ttlang_kernels`` flag of ``Transformer``: the decode layer's
residual add + RMSNorm (``ttedge.kernels.residual_rmsnorm``, one fused op) and SiLU-and-multiply
(``ttedge.kernels.swiglu``) where tt-lang, the TT-Lang compiler, is installed; ttnn's ops otherwise. The
choice and its reason are logged once per model.

What cannot be checked in this repository: tt-lang 1.1.1 pins ttnn 0.69.0 and the port pins 0.81.1, so no
environment here holds both, and there is no card. The TT tier runs the flag and the ttnn fallback on mock
clusters; the kernels themselves run in the simulator (tests/kernels) and, on a card with tt-lang, in
``tests/kernels/test_hardware.py``. The kernel branches below are what a card would run, unexecuted here.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.kernels.footprint import residual_rmsnorm_l1_bytes
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, TILE, WEIGHTS_MEMORY
from ttedge.models.llama.tt.rmsnorm import RMSNorm
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
    reason: str

    def describe(self) -> str:
        def op(name: str, on: bool) -> str:
            return f"{name}: {'TT-Lang kernel' if on else 'ttnn'}"

        return f"{op('residual+RMSNorm', self.residual_rmsnorm)}, {op('SwiGLU', self.swiglu)} ({self.reason})"


TTNN_ONLY = KernelChoice(residual_rmsnorm=False, swiglu=False, reason="ttlang_kernels is off")


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
        choice = KernelChoice(False, False, f"ttlang_kernels requested, but {missing}: ttnn ops instead")
    else:
        norm_bytes = residual_rmsnorm_l1_bytes(config.hidden_size)
        fits = norm_bytes <= _DATAFLOW_BUFFER_BUDGET
        reason = "ttlang_kernels on" + (
            ""
            if fits
            else f"; the fused norm needs {norm_bytes} B of L1 per core at hidden {config.hidden_size}, "
            f"over the {_DATAFLOW_BUFFER_BUDGET} B budget"
        )
        choice = KernelChoice(residual_rmsnorm=fits, swiglu=True, reason=reason)
    log.info("TT port ops: %s", choice.describe())
    return choice


def _grid(mesh: ttnn.MeshDevice) -> tuple[int, int]:
    grid = mesh.compute_with_storage_grid_size()
    return (grid.y, grid.x)


def _as_rows(x: ttnn.Tensor) -> ttnn.Tensor:
    """``[1, 1, rows, width]`` as the ``[rows, width]`` tile grid the kernels index."""
    return ttnn.reshape(x, (x.shape[-2], x.shape[-1]))


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
            rows = weight.to_numpy().astype(np.float32).reshape(1, -1)
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
