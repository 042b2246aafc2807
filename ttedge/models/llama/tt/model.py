"""The whole model on one chip: embedding, every decoder layer, final norm, LM head; a decode step for up to
32 users, or a prefill chunk of one user's prompt."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.attention import DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.embedding import Embedding
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
from ttedge.models.llama.tt.rope import RotarySetup, inverse_frequencies
from ttedge.models.llama.tt.ttlang import choose_kernels
from ttedge.models.llama.tt.weight_cache import WeightCache
from ttedge.models.llama.tt.weights import WeightDtypes, convert_model, host_tensor, pad_to_tile


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
    ):
        """``tensors``: canonical float32 arrays, read only for the weights ``cache`` lacks (all of them
        without a cache); ``progress`` follows the conversion (``weights.convert_model``).
        ``ttlang_kernels`` runs the decode layer's residual+RMSNorm and SwiGLU as TT-Lang kernels where
        tt-lang is installed (``ttlang.choose_kernels``; ttnn ops otherwise, the choice logged)."""
        converted = convert_model(config, tensors, preset, cache, progress)
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
            )
            for i, layer in enumerate(converted.layers)
        ]
        self.norm = RMSNorm(mesh, converted.norm, config.rms_norm_eps)
        self.lm_head = LMHead(mesh, converted.lm_head)

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

    def prefill(
        self, tokens: np.ndarray, page_table_row: np.ndarray, start: int = 0, all_rows: bool = False
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
        ``[1, 1, padded n, padded vocab]``. Columns from ``config.vocab_size`` on are padding.
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
        return self.lm_head(self.norm(x, PREFILL_MEMORY))


def logits_to_host(logits: ttnn.Tensor, rows: slice, vocab_size: int) -> np.ndarray:
    """``rows`` of device logits ``[1, 1, rows, padded vocab]`` as float32 ``[len(rows), vocab_size]``.

    Typecast on the device first: numpy has no bfloat16, and ``to_numpy`` of a bfloat16 tensor gives an
    object array (docs/tt-validation.md).
    """
    host = ttnn.typecast(logits, ttnn.float32).cpu().to_numpy()
    return np.ascontiguousarray(host.reshape(host.shape[-2], host.shape[-1])[rows, :vocab_size])
