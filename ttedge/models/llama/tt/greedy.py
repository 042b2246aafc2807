"""Greedy decoding on the device: each row's argmax token id, so only 4 bytes per row cross PCIe instead
of the row's logits (tt_transformers' ``argmax_on_device``); and greedy verification of drafts there, so
only an accepted length and a token per sequence cross it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ttnn

from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, TILE
from ttedge.models.llama.tt.tensor_parallel import first_chip
from ttedge.models.llama.tt.ttlang import AcceptedLengths
from ttedge.models.llama.tt.weights import host_tensor


def greedy_token_ids(logits: ttnn.Tensor, vocab_size: int) -> ttnn.Tensor:
    """Argmax over the real vocabulary of device logits ``[1, 1, rows, padded vocab]``: uint32
    ``[1, 1, rows]``, row-major in DRAM.

    ttnn 0.81.1's ``argmax`` over the last dimension runs multi-core only on row-major input (a tile input
    runs on a single core, per its docstring), hence the untilize. The slice drops the vocabulary padding:
    its weight rows are zero, so its logits are 0 and would win every row whose real logits are all negative.
    """
    rows = ttnn.untilize(logits)
    real = ttnn.slice(rows, (0, 0, 0, 0), (1, 1, rows.shape[-2], vocab_size))
    return ttnn.argmax(real, dim=-1)


def token_ids_to_host(ids: ttnn.Tensor, rows: slice) -> np.ndarray:
    """``rows`` of device token ids ``[1, 1, rows]`` as int64 ``[len(rows)]`` (on a mesh, chip 0's: every
    chip picks the same ids from the same gathered logits)."""
    return first_chip(ids).cpu().to_numpy().reshape(-1)[rows].astype(np.int64)


class DeviceTokenIds:
    """Greedy token ids left on the device, one ``[1, 1, rows]`` tensor per forward, for a verification on
    the device (``verify_greedy``) instead of a read-back."""

    def __init__(self) -> None:
        self.pieces: list[ttnn.Tensor] = []
        self.length = 0

    def keep(self, ids: ttnn.Tensor, rows: slice) -> np.ndarray:
        """Keep a forward's ids; returns where its ``rows`` will be in the concatenation of every piece."""
        offset = self.length
        # A copy: a traced decode's output is rewritten by its next replay, within the same step when the
        # step takes two decode forwards.
        self.pieces.append(ttnn.clone(ids))
        self.length += ids.shape[-1]
        return np.arange(offset + rows.start, offset + rows.stop)

    def concatenated(self) -> ttnn.Tensor:
        return self.pieces[0] if len(self.pieces) == 1 else ttnn.concat(self.pieces, dim=-1)


def verification_grids(
    rows: Sequence[np.ndarray], drafts: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The host side of ``verify_greedy``: uint32 ``where`` and float32 ``draft`` grids ``[rows, cols]``, a
    row per sequence and a column per compared position, both padded to whole tiles. ``where[i, j]`` is
    the position among the kept ids of sequence ``i``'s argmax before its draft ``j`` (at ``j ==
    len(drafts[i])``, after the last draft: the bonus token); ``draft[i, j]`` is that draft, and
    ``AcceptedLengths.DRAFT_PAD`` from the bonus column on, so the prefix of matches ends there."""
    if len(rows) != len(drafts):
        raise ValueError(f"{len(drafts)} draft lists for {len(rows)} sequences")
    grid_rows = -(-len(rows) // TILE) * TILE
    grid_cols = -(-max(len(draft) + 1 for draft in drafts) // TILE) * TILE
    # Padding gathers position 0, whose id meets a padded draft: never a match.
    where = np.zeros((grid_rows, grid_cols), np.uint32)
    draft_grid = np.full((grid_rows, grid_cols), AcceptedLengths.DRAFT_PAD, np.float32)
    for index, (targets, draft) in enumerate(zip(rows, drafts, strict=True)):
        if len(targets) < len(draft) + 1:
            raise ValueError(
                f"sequence {index}: {len(draft)} drafts need {len(draft) + 1} argmax rows, got {len(targets)}"
            )
        compared = targets[len(targets) - len(draft) - 1 :]
        where[index, : len(compared)] = compared
        draft_grid[index, : len(draft)] = draft
    return where, draft_grid


def verify_greedy(
    kept: DeviceTokenIds,
    rows: Sequence[np.ndarray],
    drafts: Sequence[Sequence[int]],
    accepted_lengths: AcceptedLengths,
) -> list[tuple[int, int]]:
    """Greedy verification on the device: per sequence, how many of its ``drafts`` the target accepts and
    the target's token after them (a correction, or the bonus token after a fully accepted draft).

    ``rows[i]``: where sequence ``i``'s argmax ids are among ``kept``'s (``DeviceTokenIds.keep``), in token
    order, the last ``len(drafts[i]) + 1`` of them at its last token and each draft. The ids are gathered
    into a grid of a row per sequence (``verification_grids``), the drafts are compared there
    (``AcceptedLengths``: the TT-Lang kernel or ttnn's ops) and the token is gathered at the accepted
    length: two numbers per sequence cross PCIe instead of ``len(drafts[i]) + 1`` ids.
    """
    where, draft_grid = verification_grids(rows, drafts)
    mesh = accepted_lengths.mesh
    where_tensor = host_tensor(where.reshape(1, 1, -1), ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT).to(mesh)
    gathered = ttnn.gather(kept.concatenated(), -1, index=where_tensor)
    target_ids = ttnn.to_layout(ttnn.reshape(gathered, where.shape), ttnn.TILE_LAYOUT)
    accepted = accepted_lengths(
        host_tensor(draft_grid, ttnn.float32).to(mesh, ACTIVATIONS_MEMORY),
        ttnn.typecast(target_ids, ttnn.float32),
    )
    counts = ttnn.typecast(accepted, ttnn.uint32)
    tokens = ttnn.gather(target_ids, -1, index=counts)
    # One read of [rows, 2] row-major uint32, 8 bytes a sequence: in tile layout each column would be a
    # whole 4 KiB tile.
    verdicts = ttnn.to_layout(ttnn.concat([counts, tokens], dim=-1), ttnn.ROW_MAJOR_LAYOUT)
    host = first_chip(verdicts).cpu().to_numpy().reshape(where.shape[0], 2)
    return [(int(count), int(token)) for count, token in host[: len(rows)]]
