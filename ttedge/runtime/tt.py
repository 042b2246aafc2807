"""The TT backend: the TT-NN port (``ttedge.models.llama.tt``) behind the ``ModelRunner`` protocol.

Two layers, so that the TT validation tier (ttnn, no torch) can run everything that touches the device:

- ``TtDeviceRunner`` takes ``StepInput`` lists and returns numpy float32 logits, or greedy token ids
  computed on the device. It maps block tables onto device page tables and splits a step into batched
  decode steps and per-sequence prefill chunks (``tt_host``), runs them on the ``Transformer`` (decode
  traced on a card) and reads the results back, logits cut to the real vocabulary.
- ``TtModelRunner`` is the engine's runner: it owns the ``BlockAllocator`` over the device's KV blocks and
  hands the results over as torch tensors.

Weights go through the on-disk cache (``ttedge.models.llama.tt.weight_cache``): ``convert_checkpoint``
(``ttedge convert``) fills it without opening a device, and a later start reads no weight of the checkpoint.

A model runs on one chip or split over a 1xN mesh of chips (``ttedge.models.llama.tt.tensor_parallel``),
opened from an ``ethernet_mesh`` topology (``open_tt_device``); the cache holds each chip's slices apart.
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
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.ethernet_mesh.topology import BUILT_IN_MESHES, Mesh
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.greedy import DeviceTokenIds, token_ids_to_host, verify_greedy
from ttedge.models.llama.tt.model import Transformer, logits_to_host
from ttedge.models.llama.tt.model_config import TILE
from ttedge.models.llama.tt.traced_decode import TracedDecode
from ttedge.models.llama.tt.ttlang import AcceptedLengths
from ttedge.models.llama.tt.weight_cache import (
    WeightCache,
    checkpoint_files,
    default_cache_dir,
    model_identity,
)
from ttedge.models.llama.tt.weights import check_config, convert_model
from ttedge.runtime.base import DeviceUnavailable, StepInput
from ttedge.runtime.tt_host import (
    DECODE_BATCH,
    DEFAULT_MESH,
    MOCK_CLUSTER_VARIABLE,
    DecodeStep,
    OutputRows,
    PageTables,
    PrefillChunk,
    blocks_needed,
    check_tt_device,
    kv_cache_blocks,
    mesh_plan,
    plan_steps,
)

if TYPE_CHECKING:
    import torch

    from ttedge.checkpoint import Checkpoint
    from ttedge.checkpoint.base import TensorSource

log = logging.getLogger(__name__)

# DRAM kept for decode traces (ttnn's default trace region is 0 bytes). Headroom for the commands of two
# decode traces (logits and greedy), not a measured size: tt-metal's model tests reserve 10 to 100 MB.
DECODE_TRACE_REGION_BYTES = 32 * 2**20


def fabric_config(mesh: Mesh) -> ttnn.FabricConfig:
    """The fabric the collectives of a 1-D tensor-parallel group travel over: a ring where the chips close
    one (an 8-chip T3K), else a line (tt_transformers opens T3K with ``FABRIC_1D_RING``, N300 with
    ``FABRIC_1D``)."""
    return ttnn.FabricConfig.FABRIC_1D_RING if mesh.is_ring else ttnn.FabricConfig.FABRIC_1D


def open_tt_device(mesh: Mesh = BUILT_IN_MESHES[DEFAULT_MESH]) -> ttnn.MeshDevice:
    """Open the chips of ``mesh`` (``ethernet_mesh.topology``; default one chip), or raise
    ``DeviceUnavailable`` saying why not.

    One chip opens as before (no fabric). A 1xN mesh sets the fabric first (``fabric_config``) and opens
    with dispatch on worker cores: with ttnn 0.81.1's default for multi-chip Wormhole (dispatch on Ethernet
    cores) the device reports an 8x8 worker grid while ``typecast``'s placement check allows 8x7 and
    refuses the op (seen on the mock n300 and T3K; docs/tt-validation.md). Close with ``close_tt_device``.
    """
    check_tt_device()
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        log.warning(
            "%s is set: ttnn runs on a mock cluster, which validates ops but computes nothing "
            "(logits are zeros)",
            MOCK_CLUSTER_VARIABLE,
        )
    try:
        if mesh.num_chips == 1:
            return ttnn.open_device(device_id=0, trace_region_size=DECODE_TRACE_REGION_BYTES)
        ttnn.set_fabric_config(fabric_config(mesh))
        try:
            return ttnn.open_mesh_device(
                ttnn.MeshShape(*mesh.shape),
                trace_region_size=DECODE_TRACE_REGION_BYTES,
                dispatch_core_config=ttnn.DispatchCoreConfig(ttnn.DispatchCoreType.WORKER),
            )
        except RuntimeError:
            ttnn.set_fabric_config(ttnn.FabricConfig.DISABLED)
            raise
    except RuntimeError as err:
        # Without a card the driver asserts ("TT_FATAL ... No chips detected in the cluster").
        if "No chips detected" in str(err):
            raise DeviceUnavailable(
                "--device tt: no Tenstorrent device found (the driver sees no chip)"
            ) from None
        raise


def close_tt_device(device: ttnn.MeshDevice) -> None:
    """Close what ``open_tt_device`` opened, and the fabric with a mesh of several chips."""
    chips = device.get_num_devices()
    ttnn.close_mesh_device(device)
    if chips > 1:
        ttnn.set_fabric_config(ttnn.FabricConfig.DISABLED)


class TtDeviceRunner:
    """The device-facing runner: numpy in and out, one chip or a 1xN mesh (each chip a KV cache of its KV
    heads), a paged KV cache of ``num_blocks`` blocks that the engine hands out, plus one scratch block
    (``tt_host.PageTables``); ``ring``: the mesh's chips close a ring (``Transformer``).

    ``traced_decode``: decode steps captured once and replayed (``TracedDecode``; the device needs a trace
    region, as ``open_tt_device`` reserves). By default on a card, never on a mock cluster, where capture
    crashes; untraced decode runs the same ops.
    """

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
        traced_decode: bool | None = None,
        ring: bool = False,
    ):
        self.config = config
        self.max_model_len = max_model_len
        self.pages = PageTables(num_blocks, blocks_needed(max_model_len))
        self.model = Transformer(
            mesh, config, tensors, preset, self.pages.device_blocks, cache, progress, ttlang_kernels, ring
        )
        if traced_decode is None:
            traced_decode = not os.environ.get(MOCK_CLUSTER_VARIABLE)
        self.traced_decode = TracedDecode(self.model) if traced_decode else None
        self.accepted_lengths = AcceptedLengths(mesh, self.model.kernels.speculative_acceptance)

    def forward(self, inputs: Sequence[StepInput]) -> list[np.ndarray]:
        """Logits per input, float32 ``[n, vocab_size]``: ``n = len(token_ids)`` with ``all_logits``,
        else 1."""
        return self._run(inputs, greedy=False)

    def greedy_tokens(self, inputs: Sequence[StepInput]) -> list[np.ndarray]:
        """As ``forward``, but each row's argmax token id, int64 ``[n]``, computed on the device: only the
        ids are read back."""
        return self._run(inputs, greedy=True)

    def verify_greedy(
        self, inputs: Sequence[StepInput], drafts: Sequence[Sequence[int]]
    ) -> list[tuple[int, int]]:
        """Greedy verification on the device: per input, ``(accepted, token)``, how many of its ``drafts``
        (the last ``len(drafts)`` of its token ids, with ``all_logits``) the model's argmax accepts and the
        model's token after them; ``(0, argmax of the last token)`` for an input without drafts. Only those
        two numbers per input are read back (``greedy.verify_greedy``)."""
        for index, (step, draft) in enumerate(zip(inputs, drafts, strict=True)):
            if draft and (not step.all_logits or list(step.token_ids[-len(draft) :]) != list(draft)):
                raise ValueError(f"input {index}: its drafts must end its token ids, with all_logits")
        if not inputs:
            return []
        kept = DeviceTokenIds()
        rows = self._run(inputs, greedy=True, kept=kept)
        return verify_greedy(kept, rows, drafts, self.accepted_lengths)

    def _run(
        self, inputs: Sequence[StepInput], greedy: bool, kept: DeviceTokenIds | None = None
    ) -> list[np.ndarray]:
        """``kept``: greedy ids stay on the device there, and each input's result is where its rows are
        among them (``DeviceTokenIds.keep``) instead of the ids."""
        for index, step in enumerate(inputs):
            if step.start + len(step.token_ids) > self.max_model_len:
                raise ValueError(
                    f"input {index} reaches position {step.start + len(step.token_ids)}, past the "
                    f"{self.max_model_len}-token context"
                )
        outputs = OutputRows(inputs)
        for work in plan_steps(inputs):
            if isinstance(work, DecodeStep):
                self._decode(work, outputs, greedy, kept)
            else:
                self._prefill(work, outputs, greedy, kept)
        return outputs.results()

    def _decode(
        self, step: DecodeStep, outputs: OutputRows, greedy: bool, kept: DeviceTokenIds | None
    ) -> None:
        batch = self.pages.decode_batch(step.tokens)
        if len(batch.cache_updates) == 1:
            decode = self.traced_decode or self.model.decode
            out = decode(batch.tokens, batch.positions, batch.page_table, greedy)
        else:  # drafts verified inside a block: untraced, each with its number of cache updates
            out = self.model.decode(
                batch.tokens, batch.positions, batch.page_table, greedy, batch.cache_updates
            )
        if not any(token.keep_logits for token in step.tokens):
            return  # tokens on the way to a block boundary before a prefill: nothing reads their logits
        rows = self._output_rows(out, slice(0, len(step.tokens)), greedy, kept)
        for slot, token in enumerate(step.tokens):
            if token.keep_logits:
                outputs.add(token.input_index, rows[slot : slot + 1])

    def _prefill(
        self, chunk: PrefillChunk, outputs: OutputRows, greedy: bool, kept: DeviceTokenIds | None
    ) -> None:
        n = len(chunk.tokens)
        out = self.model.prefill(
            np.asarray(chunk.tokens, np.uint32),
            self.pages.row(chunk.block_table),
            chunk.start,
            all_rows=chunk.all_rows,
            greedy=greedy,
        )
        if not chunk.keep_logits:
            return
        # Without all_rows the device returned the last token's tile row only.
        rows = slice(0, n) if chunk.all_rows else slice((n - 1) % TILE, (n - 1) % TILE + 1)
        outputs.add(chunk.input_index, self._output_rows(out, rows, greedy, kept))

    def _output_rows(
        self, out: ttnn.Tensor, rows: slice, greedy: bool, kept: DeviceTokenIds | None
    ) -> np.ndarray:
        if kept is not None:
            return kept.keep(out, rows)
        return token_ids_to_host(out, rows) if greedy else logits_to_host(out, rows, self.config.vocab_size)


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


def checkpoint_cache(
    checkpoint: Checkpoint, mesh_shape: tuple[int, int], cache_dir: Path | None = None
) -> WeightCache:
    """The weight cache of ``checkpoint`` split over a mesh of ``mesh_shape``, under ``cache_dir`` (default:
    ``$TTEDGE_TT_CACHE`` or ``~/.cache/ttedge/tt-weights``)."""
    identity = model_identity(checkpoint.config, checkpoint_files(checkpoint.path))
    return WeightCache(cache_dir or default_cache_dir(), identity, mesh_shape)


@contextmanager
def conversion_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (a terminal only) fed by ``convert_model``'s ``progress(done, total)``."""
    with tqdm(desc=label, unit="layer", disable=None, leave=False) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def convert_checkpoint(
    checkpoint: Checkpoint,
    preset: PrecisionPreset,
    cache_dir: Path | None = None,
    mesh: Mesh = BUILT_IN_MESHES[DEFAULT_MESH],
) -> WeightCache:
    """Convert every weight of ``checkpoint`` at ``preset``, split for ``mesh`` (default one chip), into the
    cache, on the host (no device is opened); weights already cached are checked, not converted again.
    A plan that does not divide is refused first (``tt_host.mesh_plan``). Returns the cache and its counts."""
    config = checkpoint.config
    mesh_plan(mesh, config)
    cache = checkpoint_cache(checkpoint, mesh.shape, cache_dir)
    tensors = Float32Tensors(checkpoint.tensors)
    with conversion_progress(f"converting {config.name} ({preset.name}, {mesh.name})") as progress:
        convert_model(config, tensors, preset, cache, progress, mesh.num_chips)
    return cache


class TtModelRunner:
    """The ``ModelRunner`` of the TT backend (``ttedge/runtime/base.py``)."""

    def __init__(self, device: TtDeviceRunner):
        # kv_cache imports torch, which the TT validation tier's environment lacks; it tests TtDeviceRunner.
        from ttedge.runtime.kv_cache import BlockAllocator

        self.device = device
        self.config: ModelConfig = device.config
        self.max_model_len = device.max_model_len
        # A decode step has DECODE_BATCH slots, and drafts verified inside a block take one slot per token
        # (tt_host.plan_steps): past that many rows a step needs a second forward.
        self.cheap_rows: int | None = DECODE_BATCH
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
        traced_decode: bool | None = None,
        ring: bool = False,
    ) -> TtModelRunner:
        """``mesh``: one chip or a 1xN mesh (``open_tt_device``), ``ring`` when its chips close a ring;
        ``kv_cache_bytes`` is the KV memory of each chip. ``ttlang_kernels``: the port's TT-Lang kernels
        where tt-lang is installed (``Transformer``); ``traced_decode``: see ``TtDeviceRunner``."""
        config = checkpoint.config
        check_config(config)  # before converting every weight
        plan = plan_tensor_parallel(config, mesh.get_num_devices())
        context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        num_blocks = kv_cache_blocks(config, preset.kv_cache, kv_cache_bytes, plan.kv_heads_per_device)
        cache = checkpoint_cache(checkpoint, (1, plan.devices))
        tensors = Float32Tensors(checkpoint.tensors)
        with conversion_progress(f"loading {config.name} ({preset.name})") as progress:
            device = TtDeviceRunner(
                mesh,
                config,
                tensors,
                preset,
                num_blocks,
                context,
                cache,
                progress,
                ttlang_kernels,
                traced_decode,
                ring,
            )
        log.info("TT weights: %d converted, %d from %s", cache.converted, cache.loaded, cache.directory)
        return cls(device)

    def run(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        import torch

        return [torch.from_numpy(rows) for rows in self.device.forward(inputs)]

    def run_greedy(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        """As ``run``, but each row's argmax token id (int64 ``[n]``) instead of its logits, picked on the
        device so that only token ids cross PCIe. For steps where every sequence decodes greedily and asks
        for no logprobs. Both argmaxes see the same bfloat16 logits; where several are equal, which of them
        ttnn's argmax picks is not documented (torch picks the first)."""
        import torch

        return [torch.from_numpy(ids) for ids in self.device.greedy_tokens(inputs)]

    def run_greedy_verify(self, inputs: list[StepInput], drafts: list[list[int]]) -> list[tuple[int, int]]:
        """Greedy verification on the device (``TtDeviceRunner.verify_greedy``)."""
        return self.device.verify_greedy(inputs, drafts)
