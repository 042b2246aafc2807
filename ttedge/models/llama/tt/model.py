"""The whole model on one chip or split over a 1xN mesh (``tensor_parallel.py``): embedding, every decoder
layer, final norm, LM head; a decode step for up to 32 users, or a prefill chunk of one user's prompt."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.attention import DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.embedding import Embedding
from ttedge.models.llama.tt.greedy import greedy_token_ids
from ttedge.models.llama.tt.lm_head import LMHead
from ttedge.models.llama.tt.model_config import (
    BATCH,
    BLOCK_TOKENS,
    MAX_PREFILL_TOKENS,
    PREFILL_MEMORY,
    TILE,
    DeviceSpec,
)
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.rope import RotaryInputs, RotarySetup
from ttedge.models.llama.tt.rope_tables import inverse_frequencies
from ttedge.models.llama.tt.tensor_parallel import TensorParallel, first_chip
from ttedge.models.llama.tt.ttlang import choose_kernels
from ttedge.models.llama.tt.weight_cache import WeightCache
from ttedge.models.llama.tt.weights import WeightDtypes, convert_model, host_tensor, pad_to_tile


@dataclass(frozen=True)
class DecodeTensors:
    """One decode step's inputs: host tensors made from the step's arrays, or the device tensors the ops
    read. A traced decode keeps one device set for good and copies each step's host set into it."""

    tokens: ttnn.Tensor  # [1, BATCH] uint32, row-major
    positions: ttnn.Tensor  # [BATCH] int32, row-major
    page_table: ttnn.Tensor  # [BATCH, blocks_per_user] int32, row-major
    cos: ttnn.Tensor  # [1, BATCH, TILE, head_dim] bfloat16; on the device one user per core
    sin: ttnn.Tensor

    def copy_to(self, device: DecodeTensors) -> None:
        """Write these host tensors into ``device``'s buffers in place (same shapes, dtypes and layouts)."""
        for field in fields(self):
            ttnn.copy_host_to_device_tensor(getattr(self, field.name), getattr(device, field.name))


class Transformer:
    """Decode for up to ``BATCH`` users, and prefill for one, over a paged KV cache of ``num_blocks``
    32-token blocks per layer.

    The caller owns the block tables (``ttedge.runtime``): each step passes every user's page table row
    and position; unused user slots are padded (any position, any page table row of valid blocks). A
    padded slot still writes its K/V at its position, so its blocks must be ones no live user reads.
    """

    def __init__(
        self,
        mesh: ttnn.MeshDevice,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        preset: PrecisionPreset,
        num_blocks: int,
        cache: WeightCache | None = None,
        progress: Callable[[int, int], None] | None = None,
        ttlang_kernels: bool = False,
        ring: bool = False,
    ):
        """``tensors``: canonical float32 arrays, read only for the weights ``cache`` lacks (all of them
        without a cache); ``progress`` follows the conversion (``weights.convert_model``).
        ``ttlang_kernels`` runs the decode layer's residual+RMSNorm and SwiGLU as TT-Lang kernels where
        tt-lang is installed (``ttlang.choose_kernels``; ttnn ops otherwise, the choice logged).

        On a 1xN mesh the weights are split over its chips as ``ethernet_mesh.sharding`` plans
        (``ShardingError`` first when a split does not divide); ``ring``: the chips close a ring, so the
        collectives use ttnn's Ring topology rather than Linear."""
        self.tp = TensorParallel.over(config, mesh.get_num_devices(), ring)
        converted = convert_model(config, tensors, preset, cache, progress, self.tp.devices)
        self.mesh = mesh
        self.config = config
        spec = DeviceSpec.of(mesh)
        freq_factors = tensors.get("rope.freq_factors")
        self.rope = RotarySetup(mesh, spec, config, inverse_frequencies(config, freq_factors))
        self.embedding = Embedding(mesh, converted.embed)
        self.kernels = choose_kernels(ttlang_kernels, config)
        self.layers = [
            DecoderLayer(
                mesh,
                spec,
                config,
                layer,
                WeightDtypes.from_preset(preset, i).kv_cache,
                num_blocks,
                self.kernels,
                self.tp,
            )
            for i, layer in enumerate(converted.layers)
        ]
        self.norm = RMSNorm(mesh, converted.norm, config.rms_norm_eps)
        self.lm_head = LMHead(mesh, converted.lm_head, self.tp)

    def decode(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        page_table: np.ndarray,
        greedy: bool = False,
        cache_updates: np.ndarray | None = None,
    ) -> ttnn.Tensor:
        """One token for each of ``BATCH`` slots: ``tokens`` and ``positions`` ``[BATCH]``, ``page_table``
        ``[BATCH, blocks_per_user]``. Returns logits ``[1, 1, BATCH, padded vocab]`` on the device (columns
        from ``config.vocab_size`` on are padding), or with ``greedy`` each slot's argmax token id, uint32
        ``[1, 1, BATCH]``.

        Slots are users; with ``cache_updates`` ``[waves, BATCH]`` (``tt_host.DecodeBatch``) several may be
        one user at consecutive positions over the same page table row. The cache updates all run before
        attention, so each slot attends to exactly the K/V that decoding the tokens one by one gives."""
        step = self.decode_inputs_to_device(self.decode_host_inputs(tokens, positions, page_table))
        updates = None
        if cache_updates is not None:
            updates = [
                host_tensor(row, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh) for row in cache_updates
            ]
        return self.decode_on_device(step, greedy, updates)

    def decode_host_inputs(
        self, tokens: np.ndarray, positions: np.ndarray, page_table: np.ndarray
    ) -> DecodeTensors:
        if tokens.shape != (BATCH,) or positions.shape != (BATCH,) or page_table.shape[0] != BATCH:
            raise ValueError(f"decode takes exactly {BATCH} users (pad unused slots)")
        cos, sin = self.rope.decode_cos_sin(positions)
        return DecodeTensors(
            tokens=host_tensor(tokens[None], ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT),
            positions=host_tensor(positions, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT),
            page_table=host_tensor(page_table, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT),
            cos=cos,
            sin=sin,
        )

    def decode_inputs_to_device(self, host: DecodeTensors) -> DecodeTensors:
        """New device tensors holding ``host``: DRAM interleaved, cos/sin sharded one user per core."""
        return DecodeTensors(
            tokens=host.tokens.to(self.mesh),
            positions=host.positions.to(self.mesh),
            page_table=host.page_table.to(self.mesh),
            cos=host.cos.to(self.mesh, self.rope.cos_sin_memory),
            sin=host.sin.to(self.mesh, self.rope.cos_sin_memory),
        )

    def decode_on_device(
        self, step: DecodeTensors, greedy: bool = False, cache_updates: Sequence[ttnn.Tensor] | None = None
    ) -> ttnn.Tensor:
        """The decode step's ops over inputs already on the device: what a traced decode captures (with
        the one cache update at ``step.positions``, the default)."""
        layer_inputs = DecodeInputs(
            positions=step.positions,
            page_table=step.page_table,
            rotary=RotaryInputs(cos=step.cos, sin=step.sin, trans_mat=self.rope.trans_mat),
            cache_updates=(step.positions,) if cache_updates is None else cache_updates,
        )
        x = self.embedding(step.tokens)
        for layer in self.layers:
            x = layer(x, layer_inputs)
        logits = self.lm_head(self.norm(x))
        return greedy_token_ids(logits, self.config.vocab_size) if greedy else logits

    def prefill(
        self,
        tokens: np.ndarray,
        page_table_row: np.ndarray,
        start: int = 0,
        all_rows: bool = False,
        greedy: bool = False,
    ) -> ttnn.Tensor:
        """One prefill chunk of one user, tt_transformers' ``forward`` in prefill mode.

        ``tokens`` ``[n]`` sit at positions ``start .. start + n - 1``: ``start`` is a multiple of
        BLOCK_TOKENS (K/V are copied into the cache a whole block at a time) and ``n`` at most
        MAX_PREFILL_TOKENS. The chunk is padded here to whole tiles; padding rows come after every real
        row, so causal attention keeps them out of the real ones, and their K/V land in the slots past the
        user's last token, which nothing reads before a later token overwrites them. ``page_table_row``
        ``[blocks_per_user]`` is the user's blocks in order (the tail padded with any valid block) and must
        cover ``start + n`` tokens rounded up to a tile.

        Returns logits on the device: by default only for the 32-row tile holding the last token,
        ``[1, 1, TILE, padded vocab]`` with the last token at row ``(n - 1) % TILE`` (the LM head then
        costs one tile row, not the whole prompt); with ``all_rows`` for every padded row,
        ``[1, 1, padded n, padded vocab]``. Columns from ``config.vocab_size`` on are padding. With
        ``greedy``, each of those rows' argmax token id instead, uint32 ``[1, 1, rows]``.
        """
        n = len(tokens)
        if not 0 < n <= MAX_PREFILL_TOKENS:
            raise ValueError(f"a prefill chunk holds 1 to {MAX_PREFILL_TOKENS} tokens, got {n}")
        if start % BLOCK_TOKENS:
            raise ValueError(
                f"a prefill chunk starts on a block boundary ({BLOCK_TOKENS} tokens), not at {start}"
            )
        padded = pad_to_tile(n)
        first_block, chunk_blocks = start // BLOCK_TOKENS, padded // BLOCK_TOKENS
        if page_table_row.ndim != 1 or page_table_row.size < first_block + chunk_blocks:
            raise ValueError(
                f"a prefill of {n} tokens at {start} needs a page table row of at least "
                f"{first_block + chunk_blocks} blocks, got shape {page_table_row.shape}"
            )
        ids = np.zeros(padded, np.uint32)
        ids[:n] = tokens
        fill = page_table_row[first_block : first_block + chunk_blocks]
        step = PrefillInputs(
            start=start,
            fill_page_table=host_tensor(fill[None], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh),
            page_table=host_tensor(page_table_row[None], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh),
            rotary=self.rope.for_prefill(start, padded),
        )
        ids_tensor = host_tensor(ids[None], ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT).to(self.mesh)
        x = self.embedding(ids_tensor, PREFILL_MEMORY)
        for layer in self.layers:
            x = layer.prefill(x, step)
        if not all_rows:
            # tt_transformers' get_last_token: slice the last token's tile row before the norm and head.
            last_tile = (n - 1) // TILE * TILE
            x = ttnn.slice(x, (0, 0, last_tile, 0), (1, 1, last_tile + TILE, self.config.hidden_size))
        logits = self.lm_head(self.norm(x, PREFILL_MEMORY))
        return greedy_token_ids(logits, self.config.vocab_size) if greedy else logits


def logits_to_host(logits: ttnn.Tensor, rows: slice, vocab_size: int) -> np.ndarray:
    """``rows`` of device logits ``[1, 1, rows, padded vocab]`` as float32 ``[len(rows), vocab_size]``.

    Typecast on the device first: numpy has no bfloat16, and ``to_numpy`` of a bfloat16 tensor gives an
    object array (docs/tt-validation.md). On a mesh every chip holds the gathered logits: chip 0's are read.
    """
    host = first_chip(ttnn.typecast(logits, ttnn.float32)).cpu().to_numpy()
    return np.ascontiguousarray(host.reshape(host.shape[-2], host.shape[-1])[rows, :vocab_size])
