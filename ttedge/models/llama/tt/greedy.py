"""Greedy decoding on the device: each row's argmax token id, so only 4 bytes per row cross PCIe instead
of the row's logits (tt_transformers' ``argmax_on_device``)."""

from __future__ import annotations

import numpy as np
import ttnn

from ttedge.models.llama.tt.tensor_parallel import first_chip


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
