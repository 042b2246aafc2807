"""The TT backend: the TT-NN port (``ttedge.models.llama.tt``) behind the ``ModelRunner`` protocol.

Two layers, so that the TT validation tier (ttnn, no torch) can run everything that touches the device:

- ``TtDeviceRunner`` takes ``StepInput`` lists and returns numpy float32 logits. It maps block tables onto
  device page tables and splits a step into batched decode steps and per-sequence prefill chunks
  (``tt_host``), runs them on the ``Transformer`` and reads the logits back, cut to the real vocabulary.
- ``TtModelRunner`` is the engine's runner: it owns the ``BlockAllocator`` over the device's KV blocks and
  hands the logits over as torch tensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.model import Transformer, logits_to_host
from ttedge.models.llama.tt.model_config import TILE
from ttedge.models.llama.tt.weights import check_config
from ttedge.runtime.base import DeviceUnavailable, StepInput
from ttedge.runtime.tt_host import (
    MOCK_CLUSTER_VARIABLE,
    DecodeStep,
    LogitsRows,
    PageTables,
    PrefillChunk,
    blocks_needed,
    check_tt_device,
    kv_cache_blocks,
    plan_steps,
)

if TYPE_CHECKING:
    import torch

    from ttedge.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def open_tt_device() -> ttnn.MeshDevice:
    """Open the first Tenstorrent chip, or raise ``DeviceUnavailable`` saying why not."""
    check_tt_device()
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        log.warning(
            "%s is set: ttnn runs on a mock cluster, which validates ops but computes nothing "
            "(logits are zeros)",
            MOCK_CLUSTER_VARIABLE,
        )
    try:
        return ttnn.open_device(device_id=0)
    except RuntimeError as err:
        # Without a card the driver asserts ("TT_FATAL ... No chips detected in the cluster").
        if "No chips detected" in str(err):
            raise DeviceUnavailable(
                "--device tt: no Tenstorrent device found (the driver sees no chip)"
            ) from None
        raise


class TtDeviceRunner:
    """The device-facing runner: numpy in and out, one chip, a paged KV cache of ``num_blocks`` blocks that
    the engine hands out, plus one scratch block (``tt_host.PageTables``)."""

    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        preset: PrecisionPreset,
        num_blocks: int,
        max_model_len: int,
        ttlang_kernels: bool = False,
    ):
        self.config = config
        self.max_model_len = max_model_len
        self.pages = PageTables(num_blocks, blocks_needed(max_model_len))
        self.model = Transformer(mesh, config, tensors, preset, self.pages.device_blocks, ttlang_kernels)

    def forward(self, inputs: Sequence[StepInput]) -> list[np.ndarray]:
        """Logits per input, float32 ``[n, vocab_size]``: ``n = len(token_ids)`` with ``all_logits``,
        else 1."""
        for index, step in enumerate(inputs):
            if step.start + len(step.token_ids) > self.max_model_len:
                raise ValueError(
                    f"input {index} reaches position {step.start + len(step.token_ids)}, past the "
                    f"{self.max_model_len}-token context"
                )
        logits = LogitsRows(inputs)
        for work in plan_steps(inputs):
            if isinstance(work, DecodeStep):
                self._decode(work, logits)
            else:
                self._prefill(work, logits)
        return logits.results()

    def _decode(self, step: DecodeStep, logits: LogitsRows) -> None:
        batch = self.pages.decode_batch(step.tokens)
        out = self.model.decode(batch.tokens, batch.positions, batch.page_table)
        if not any(token.keep_logits for token in step.tokens):
            return  # tokens on the way to a block boundary before a prefill: nothing reads their logits
        rows = logits_to_host(out, slice(0, len(step.tokens)), self.config.vocab_size)
        for slot, token in enumerate(step.tokens):
            if token.keep_logits:
                logits.add(token.input_index, rows[slot : slot + 1])

    def _prefill(self, chunk: PrefillChunk, logits: LogitsRows) -> None:
        n = len(chunk.tokens)
        out = self.model.prefill(
            np.asarray(chunk.tokens, np.uint32),
            self.pages.row(chunk.block_table),
            chunk.start,
            all_rows=chunk.all_rows,
        )
        if not chunk.keep_logits:
            return
        # Without all_rows the device returned the last token's tile row only.
        rows = slice(0, n) if chunk.all_rows else slice((n - 1) % TILE, (n - 1) % TILE + 1)
        logits.add(chunk.input_index, logits_to_host(out, rows, self.config.vocab_size))


# tt_transformers' default precision when a checkpoint matches no model card with a TT preset.
DEFAULT_PRESET = PrecisionPreset(
    "default", attention_weights="bfloat8_b", mlp_weights="bfloat8_b", kv_cache="bfloat8_b"
)


class TtModelRunner:
    """The ``ModelRunner`` of the TT backend (``ttedge/runtime/base.py``)."""

    def __init__(self, device: TtDeviceRunner):
        # kv_cache imports torch, which the TT validation tier's environment lacks; it tests TtDeviceRunner.
        from ttedge.runtime.kv_cache import BlockAllocator

        self.device = device
        self.config: ModelConfig = device.config
        self.max_model_len = device.max_model_len
        # Verification runs as decode steps of the padded 32-user batch, position by position: extra rows
        # do not widen a step.
        self.cheap_rows: int | None = None
        self.allocator = BlockAllocator(device.pages.num_blocks)

    @classmethod
    def from_checkpoint(
        cls,
        mesh: ttnn.MeshDevice,
        checkpoint: Checkpoint,
        preset: PrecisionPreset,
        kv_cache_bytes: int,
        max_model_len: int | None = None,
        ttlang_kernels: bool = False,
    ) -> TtModelRunner:
        """``ttlang_kernels``: the port's TT-Lang kernels where tt-lang is installed (``Transformer``)."""
        config = checkpoint.config
        check_config(config)  # before converting every weight
        # The port prepares weights from float32 numpy arrays (ttedge/models/llama/tt/weights.py).
        tensors = {name: source.load().float().numpy() for name, source in checkpoint.tensors.items()}
        context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        num_blocks = kv_cache_blocks(config, preset.kv_cache, kv_cache_bytes)
        return cls(TtDeviceRunner(mesh, config, tensors, preset, num_blocks, context, ttlang_kernels))

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        import torch

        return [torch.from_numpy(rows) for rows in self.device.forward(inputs)]
