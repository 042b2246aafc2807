"""The TT backend: the TT-NN port (``ttedge.models.llama.tt``) behind the ``ModelRunner`` protocol.

Two layers, so that the TT validation tier (ttnn, no torch) can run everything that touches the device:

- ``TtDeviceRunner`` takes ``StepInput`` lists and returns numpy float32 logits. It maps block tables onto
  device page tables and splits a step into batched decode steps and per-sequence prefill chunks
  (``tt_host``), runs them on the ``Transformer`` and reads the logits back, cut to the real vocabulary.
- ``TtModelRunner`` is the engine's runner: it owns the ``BlockAllocator`` over the device's KV blocks and
  hands the logits over as torch tensors.

Weights go through the on-disk cache (``ttedge.models.llama.tt.weight_cache``): ``convert_checkpoint``
(``ttedge convert``) fills it without opening a device, and a later start reads no weight of the checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ttnn
from tqdm import tqdm

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.model import Transformer, logits_to_host
from ttedge.models.llama.tt.model_config import TILE
from ttedge.models.llama.tt.weight_cache import (
    SINGLE_CHIP,
    WeightCache,
    checkpoint_files,
    default_cache_dir,
    model_identity,
)
from ttedge.models.llama.tt.weights import check_config, convert_model
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
    from ttedge.checkpoint.base import TensorSource

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
        cache: WeightCache | None = None,
        progress: Callable[[int, int], None] | None = None,
        ttlang_kernels: bool = False,
    ):
        self.config = config
        self.max_model_len = max_model_len
        self.pages = PageTables(num_blocks, blocks_needed(max_model_len))
        self.model = Transformer(
            mesh, config, tensors, preset, self.pages.device_blocks, cache, progress, ttlang_kernels
        )

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


class Float32Tensors(Mapping[str, np.ndarray]):
    """A checkpoint's tensors as the float32 numpy arrays the port prepares weights from, each read when
    asked for: a conversion served by the cache reads none of them."""

    def __init__(self, sources: Mapping[str, TensorSource]):
        self.sources = sources

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sources[name].load().float().numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def checkpoint_cache(checkpoint: Checkpoint, cache_dir: Path | None = None) -> WeightCache:
    """The weight cache of ``checkpoint`` on one chip, under ``cache_dir`` (default: ``$TTEDGE_TT_CACHE`` or
    ``~/.cache/ttedge/tt-weights``)."""
    identity = model_identity(checkpoint.config, checkpoint_files(checkpoint.path))
    return WeightCache(cache_dir or default_cache_dir(), identity, SINGLE_CHIP)


@contextmanager
def conversion_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (a terminal only) fed by ``convert_model``'s ``progress(done, total)``."""
    with tqdm(desc=label, unit="layer", disable=None, leave=False) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def convert_checkpoint(
    checkpoint: Checkpoint, preset: PrecisionPreset, cache_dir: Path | None = None
) -> WeightCache:
    """Convert every weight of ``checkpoint`` at ``preset`` into the cache, on the host (no device is
    opened); weights already cached are checked, not converted again. Returns the cache and its counts."""
    cache = checkpoint_cache(checkpoint, cache_dir)
    with conversion_progress(f"converting {checkpoint.config.name} ({preset.name})") as progress:
        convert_model(checkpoint.config, Float32Tensors(checkpoint.tensors), preset, cache, progress)
    return cache


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
        context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        num_blocks = kv_cache_blocks(config, preset.kv_cache, kv_cache_bytes)
        cache = checkpoint_cache(checkpoint)
        tensors = Float32Tensors(checkpoint.tensors)
        with conversion_progress(f"loading {config.name} ({preset.name})") as progress:
            device = TtDeviceRunner(
                mesh, config, tensors, preset, num_blocks, context, cache, progress, ttlang_kernels
            )
        log.info("TT weights: %d converted, %d from %s", cache.converted, cache.loaded, cache.directory)
        return cls(device)

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        import torch

        return [torch.from_numpy(rows) for rows in self.device.forward(inputs)]
