"""The host side of the TT backend, importable without ttnn or torch.

- whether ``--device tt`` can work here (the ttnn package, a card), checked before ttnn is imported;
- the device page tables: the engine's block tables mapped onto ``[users, blocks_per_user]`` int32 rows,
  with one scratch block that belongs to no sequence;
- the plan of one ``run()``: which inputs go to batched decode steps and which to prefill chunks;
- collecting each input's output rows (logits, or greedy token ids) in token order;
- how many KV blocks a memory budget buys at a card preset's KV dtype.

Kept apart from ``ttedge.runtime.tt`` so that both test tiers can check it: the CPU suite has no ttnn and
the TT validation tier no torch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttedge.config import ModelConfig
from ttedge.runtime.base import DeviceUnavailable, StepInput

# These three equal ttedge.models.llama.tt.model_config's BATCH, BLOCK_TOKENS and MAX_PREFILL_TOKENS and
# ttedge.runtime.kv_cache.BLOCK_SIZE; they are repeated because those modules import ttnn and torch
# (tests/tt/test_tt_runner.py and tests/runtime/test_tt_host.py check that they agree).
DECODE_BATCH = 32  # a decode step runs one token for each of 32 users (one tile row)
BLOCK_TOKENS = 32  # tokens per KV block, one tile row
MAX_PREFILL_TOKENS = 1024  # the longest prefill chunk one forward takes

# Where the tt-kmd kernel driver puts one node per card.
DEVICE_DIR = Path("/dev/tenstorrent")
# Set by the TT validation tier: ttnn then opens a mock cluster (no numerics) instead of a card.
MOCK_CLUSTER_VARIABLE = "TT_METAL_MOCK_CLUSTER_DESC_PATH"


def _ttnn_installed() -> bool:
    return importlib.util.find_spec("ttnn") is not None


def check_tt_device(device_dir: Path | None = None) -> None:
    """Raise ``DeviceUnavailable`` when ``--device tt`` cannot work on this machine (cards are looked for in
    ``device_dir``, by default DEVICE_DIR).

    Checked without importing ttnn: its import logs to stderr, and without a card its device calls fail
    with a driver assertion ("No chips detected in the cluster") rather than an answer.
    """
    device_dir = DEVICE_DIR if device_dir is None else device_dir
    if not _ttnn_installed():
        raise DeviceUnavailable(
            "--device tt needs the ttnn package (pip install 'ttedge[tt]' on Python 3.10/3.12)"
        )
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        return
    if not device_dir.is_dir() or not any(device_dir.iterdir()):
        raise DeviceUnavailable(
            f"--device tt: no Tenstorrent device found ({device_dir} is missing or empty; is a card "
            "installed and the tt-kmd driver loaded?)"
        )


def blocks_needed(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_TOKENS)


# Bytes of one 32 x 32 tile per ttnn dtype: block-float tiles store one shared exponent per 16 values.
TILE_BYTES = {"bfloat16": 2048, "bfloat8_b": 1088, "bfloat4_b": 576, "float32": 4096}


def kv_cache_blocks(config: ModelConfig, kv_dtype: str, kv_cache_bytes: int) -> int:
    """How many 32-token blocks (K and V, every layer) fit in ``kv_cache_bytes`` at ``kv_dtype``; one more is
    kept on the device as the scratch block."""
    tiles_per_head = BLOCK_TOKENS * config.head_dim // (32 * 32)
    block_bytes = 2 * config.num_layers * config.num_kv_heads * tiles_per_head * TILE_BYTES[kv_dtype]
    blocks = kv_cache_bytes // block_bytes - 1
    if blocks < 1:
        raise ValueError(
            f"a TT KV cache of {kv_cache_bytes} bytes holds no block of {BLOCK_TOKENS} tokens besides the "
            f"scratch block ({block_bytes} bytes each for {config.name} at {kv_dtype})"
        )
    return blocks


@dataclass(frozen=True)
class PageTables:
    """Host block tables as device page-table rows.

    The device cache holds ``num_blocks + 1`` blocks: the engine's allocator hands out ``0 .. num_blocks - 1``
    and the last, ``scratch``, belongs to no sequence. Padded decode slots write their K/V there, and every
    row's unused tail points there, so padding never touches a live sequence's memory.
    """

    num_blocks: int
    blocks_per_user: int

    @property
    def scratch(self) -> int:
        return self.num_blocks

    @property
    def device_blocks(self) -> int:
        return self.num_blocks + 1

    def row(self, block_table: Sequence[int]) -> np.ndarray:
        """``[blocks_per_user]`` int32: the table's blocks in order, then the scratch block."""
        if len(block_table) > self.blocks_per_user:
            raise ValueError(
                f"a block table of {len(block_table)} blocks exceeds the {self.blocks_per_user} a sequence "
                f"may hold ({self.blocks_per_user * BLOCK_TOKENS} tokens)"
            )
        if any(not 0 <= block < self.num_blocks for block in block_table):
            raise ValueError(f"block table {list(block_table)} names blocks outside 0..{self.num_blocks - 1}")
        row = np.full(self.blocks_per_user, self.scratch, np.int32)
        row[: len(block_table)] = block_table
        return row

    def decode_batch(self, tokens: Sequence[DecodeToken]) -> DecodeBatch:
        """One decode step's arrays, users in ``tokens`` order, padded to DECODE_BATCH slots that each
        write position 0 of the scratch block."""
        if not 0 < len(tokens) <= DECODE_BATCH:
            raise ValueError(f"a decode step takes 1 to {DECODE_BATCH} users, got {len(tokens)}")
        ids = np.zeros(DECODE_BATCH, np.uint32)
        positions = np.zeros(DECODE_BATCH, np.int32)
        page_table = np.full((DECODE_BATCH, self.blocks_per_user), self.scratch, np.int32)
        for slot, token in enumerate(tokens):
            ids[slot], positions[slot] = token.token, token.position
            page_table[slot] = self.row(token.block_table)
        return DecodeBatch(ids, positions, page_table)


@dataclass(frozen=True)
class DecodeBatch:
    tokens: np.ndarray  # [DECODE_BATCH] uint32
    positions: np.ndarray  # [DECODE_BATCH] int32
    page_table: np.ndarray  # [DECODE_BATCH, blocks_per_user] int32


@dataclass(frozen=True)
class DecodeToken:
    """One token of one input, run in a batched decode step."""

    input_index: int
    token: int
    position: int
    block_table: Sequence[int]
    keep_logits: bool


@dataclass(frozen=True)
class DecodeStep:
    tokens: Sequence[DecodeToken]  # at most DECODE_BATCH, each from a different input


@dataclass(frozen=True)
class PrefillChunk:
    """A run of tokens of one input starting on a block boundary, run as one prefill forward."""

    input_index: int
    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]
    keep_logits: bool  # the logits of the chunk's last token (or of every token, with all_rows)
    all_rows: bool


def _pieces(index: int, step: StepInput, max_prefill_tokens: int) -> list[DecodeToken | PrefillChunk]:
    """An input as device work, in token order.

    A single token is a decode. Several tokens go to prefill, which fills the cache whole blocks at a
    time, so the tokens before the next block boundary (when ``start`` is inside a block: a prompt chunked
    by the scheduler off the boundary, a verification of drafts) go through decode one by one first.
    Which logits each piece keeps follows ``all_logits``: every token's, or the input's last token's.
    """
    tokens, start, n = step.token_ids, step.start, len(step.token_ids)
    if n == 0:
        raise ValueError(f"input {index} has no tokens")
    if len(step.block_table) * BLOCK_TOKENS < start + n:
        raise ValueError(
            f"input {index}: a block table of {len(step.block_table)} blocks cannot hold {start + n} tokens"
        )

    def keep(last_token: int) -> bool:
        return step.all_logits or last_token == n - 1

    head = n if n == 1 else min(n, -start % BLOCK_TOKENS)
    pieces: list[DecodeToken | PrefillChunk] = [
        DecodeToken(index, tokens[j], start + j, step.block_table, keep(j)) for j in range(head)
    ]
    for offset in range(head, n, max_prefill_tokens):
        end = min(n, offset + max_prefill_tokens)
        pieces.append(
            PrefillChunk(
                index, tokens[offset:end], start + offset, step.block_table, keep(end - 1), step.all_logits
            )
        )
    return pieces


def plan_steps(
    inputs: Sequence[StepInput], max_prefill_tokens: int = MAX_PREFILL_TOKENS
) -> list[DecodeStep | PrefillChunk]:
    """The device work of one ``run()``, in an order that keeps each input's tokens in sequence.

    Each round batches every input whose next piece is a decode token into decode steps of up to
    DECODE_BATCH users; when no input waits on a decode, each runs its next prefill chunk. So the common
    cases are one batched decode step for up to 32 sequences, and one prefill per prompt.
    """
    queues = [_pieces(i, step, max_prefill_tokens) for i, step in enumerate(inputs)]
    steps: list[DecodeStep | PrefillChunk] = []
    while any(queues):
        decodes: list[DecodeToken] = []
        for queue in queues:
            front = queue[0] if queue else None
            if isinstance(front, DecodeToken):
                decodes.append(front)
                queue.pop(0)
        if decodes:
            steps.extend(
                DecodeStep(decodes[first : first + DECODE_BATCH])
                for first in range(0, len(decodes), DECODE_BATCH)
            )
            continue
        for queue in queues:
            if queue:
                chunk = queue.pop(0)
                assert isinstance(chunk, PrefillChunk), "no input waits on a decode token this round"
                steps.append(chunk)
    return steps


class OutputRows:
    """Each input's output rows as pieces deliver them (logits ``[k, vocab]`` or token ids ``[k]``), checked
    against what the input asked for."""

    def __init__(self, inputs: Sequence[StepInput]):
        self.expected = [len(step.token_ids) if step.all_logits else 1 for step in inputs]
        self.rows: list[list[np.ndarray]] = [[] for _ in inputs]

    def add(self, input_index: int, rows: np.ndarray) -> None:
        self.rows[input_index].append(rows)

    def results(self) -> list[np.ndarray]:
        """``n`` rows per input, in input order."""
        out = []
        for index, (rows, expected) in enumerate(zip(self.rows, self.expected, strict=True)):
            got = sum(r.shape[0] for r in rows)
            if got != expected:
                raise AssertionError(f"input {index} got {got} output rows, expected {expected}")
            out.append(np.concatenate(rows))
        return out
