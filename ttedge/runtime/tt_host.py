"""The host side of the TT backend, importable without ttnn or torch.

- whether ``--device tt`` can work here (the ttnn package, a card), checked before ttnn is imported;
- the device page tables: the engine's block tables mapped onto ``[users, blocks_per_user]`` int32 rows,
  with one scratch block that belongs to no sequence;
- the plan of one ``run()``: which inputs go to batched decode steps and which to prefill chunks;
- collecting each input's output rows (logits, or greedy token ids) in token order;
- how many KV blocks a memory budget buys at a card preset's KV dtype;
- which precision preset a checkpoint runs (or is converted) at;
- which mesh ``--mesh`` names, and whether the model splits over it (before any device work).

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

from ttedge.config import ConfigError, ModelConfig
from ttedge.ethernet_mesh.sharding import ShardingError, TensorParallelPlan, plan_tensor_parallel
from ttedge.ethernet_mesh.topology import Mesh, MeshError, get_mesh
from ttedge.model_zoo import ModelCard, PrecisionPreset
from ttedge.runtime.base import DeviceUnavailable, StepInput

# These three equal ttedge.models.llama.tt.model_config's BATCH, BLOCK_TOKENS and MAX_PREFILL_TOKENS and
# ttedge.runtime.kv_cache.BLOCK_SIZE; they are repeated because those modules import ttnn and torch
# (tests/tt/test_tt_runner.py and tests/runtime/test_tt_host.py check that they agree).
DECODE_BATCH = 32  # a decode step runs one token for each of 32 users (one tile row)
BLOCK_TOKENS = 32  # tokens per KV block, one tile row
MAX_PREFILL_TOKENS = 1024  # the longest prefill chunk one forward takes
# A cache-update index that makes paged_update_cache leave a slot's row alone (its kernels compare the
# index, read as uint32, with (uint32)-1).
SKIP_UPDATE = -1

# Where the tt-kmd kernel driver puts one node per card.
DEVICE_DIR = Path("/dev/tenstorrent")
# Set by the TT validation tier: ttnn then opens a mock cluster (no numerics) instead of a card.
MOCK_CLUSTER_VARIABLE = "TT_METAL_MOCK_CLUSTER_DESC_PATH"


def _ttnn_installed() -> bool:
    return importlib.util.find_spec("ttnn") is not None


def check_tt_device(device_dir: Path | None = None, command: str = "--device tt") -> None:
    """Raise ``DeviceUnavailable`` when ``command`` (``--device tt``, ``ttedge convert``) cannot work on this
    machine (cards are looked for in ``device_dir``, by default DEVICE_DIR). Conversion needs a card too:
    ttnn's block-float conversion asks the driver for the chips even on the host.

    Checked without importing ttnn: its import logs to stderr, and without a card its device calls fail
    with a driver assertion ("No chips detected in the cluster") rather than an answer.
    """
    device_dir = DEVICE_DIR if device_dir is None else device_dir
    if not _ttnn_installed():
        raise DeviceUnavailable(
            f"{command} needs the ttnn package (pip install 'ttedge[tt]' on Python 3.10/3.12)"
        )
    if os.environ.get(MOCK_CLUSTER_VARIABLE):
        return
    if not device_dir.is_dir() or not any(device_dir.iterdir()):
        raise DeviceUnavailable(
            f"{command}: no Tenstorrent device found ({device_dir} is missing or empty; is a card "
            "installed and the tt-kmd driver loaded?)"
        )


# tt_transformers' default precision when a checkpoint matches no model card with a TT preset.
DEFAULT_PRESET = PrecisionPreset(
    "default", attention_weights="bfloat8_b", mlp_weights="bfloat8_b", kv_cache="bfloat8_b"
)


def choose_preset(card: ModelCard | None, name: str | None = None) -> PrecisionPreset:
    """The preset called ``name`` on the checkpoint's card, or without a name the card's recommended one
    (its first deployment's); a checkpoint no card matches has only DEFAULT_PRESET."""
    if card is None or not card.tt.presets:
        if name in (None, DEFAULT_PRESET.name):
            return DEFAULT_PRESET
        raise ConfigError(
            "--preset", f"no model card with TT presets matches this checkpoint: only {DEFAULT_PRESET.name!r}"
        )
    guide = card.tt
    if name is None:
        name = guide.deployments[0].preset if guide.deployments else guide.presets[0].name
    try:
        return guide.preset(name)
    except KeyError as err:
        raise ConfigError("--preset", f"{card.id}: {err.args[0]}") from None


# The mesh ``--mesh`` names by default: one chip, the TT backend as it runs without the option.
DEFAULT_MESH = "n150"


def resolve_mesh(name_or_path: str) -> Mesh:
    """The built-in mesh or YAML file ``--mesh`` names (``ethernet_mesh.topology``), as a ``ConfigError``
    when it names none or is not one row of chips: the port splits a model over a 1xN mesh only."""
    try:
        mesh = get_mesh(name_or_path)
    except MeshError as err:
        raise ConfigError("--mesh", str(err)) from None
    if mesh.shape[0] != 1:
        rows, cols = mesh.shape
        raise ConfigError(
            "--mesh",
            f"{mesh.name} is {rows}x{cols}: the TT port splits a model over one row of chips (1xN), "
            f"e.g. t3k rather than t3k-2x4",
        )
    return mesh


def mesh_plan(mesh: Mesh, config: ModelConfig) -> TensorParallelPlan:
    """The tensor-parallel plan of ``config`` over ``mesh``'s chips, as a ``ConfigError`` carrying the
    ``ShardingError``'s message when a split does not divide: checked before a device is opened."""
    try:
        return plan_tensor_parallel(config, mesh.num_chips)
    except ShardingError as err:
        raise ConfigError(f"--mesh {mesh.name}", str(err)) from None


def blocks_needed(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_TOKENS)


# Bytes of one 32 x 32 tile per ttnn dtype: block-float tiles store one shared exponent per 16 values.
TILE_BYTES = {"bfloat16": 2048, "bfloat8_b": 1088, "bfloat4_b": 576, "float32": 4096}


def kv_cache_blocks(
    config: ModelConfig, kv_dtype: str, kv_cache_bytes: int, kv_heads: int | None = None
) -> int:
    """How many 32-token blocks (K and V, every layer) fit in ``kv_cache_bytes`` of one chip at ``kv_dtype``,
    each chip holding ``kv_heads`` KV heads (default: all of them, as on one chip); one more is kept on the
    device as the scratch block."""
    tiles_per_head = BLOCK_TOKENS * config.head_dim // (32 * 32)
    heads = config.num_kv_heads if kv_heads is None else kv_heads
    block_bytes = 2 * config.num_layers * heads * tiles_per_head * TILE_BYTES[kv_dtype]
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
        """One decode step's arrays, slots in ``tokens`` order, padded to DECODE_BATCH slots that each
        write position 0 of the scratch block."""
        if not 0 < len(tokens) <= DECODE_BATCH:
            raise ValueError(f"a decode step takes 1 to {DECODE_BATCH} users, got {len(tokens)}")
        ids = np.zeros(DECODE_BATCH, np.uint32)
        positions = np.zeros(DECODE_BATCH, np.int32)
        page_table = np.full((DECODE_BATCH, self.blocks_per_user), self.scratch, np.int32)
        wave = np.zeros(DECODE_BATCH, np.int64)  # each slot's rank among its input's slots
        for slot, token in enumerate(tokens):
            ids[slot], positions[slot] = token.token, token.position
            page_table[slot] = self.row(token.block_table)
            if slot and tokens[slot - 1].input_index == token.input_index:
                wave[slot] = wave[slot - 1] + 1
        cache_updates = np.full((int(wave.max()) + 1, DECODE_BATCH), SKIP_UPDATE, np.int32)
        cache_updates[wave, np.arange(DECODE_BATCH)] = positions
        return DecodeBatch(ids, positions, page_table, cache_updates)


@dataclass(frozen=True)
class DecodeBatch:
    tokens: np.ndarray  # [DECODE_BATCH] uint32
    positions: np.ndarray  # [DECODE_BATCH] int32
    page_table: np.ndarray  # [DECODE_BATCH, blocks_per_user] int32
    # [waves, DECODE_BATCH] int32: the positions K/V are written at, one cache update per row. Slots of one
    # input hold consecutive positions, whose rows share cache tiles; paged_update_cache rewrites whole
    # tiles, every slot on its own core at once, so two such slots in one update would lose a row. Row w
    # updates the w-th slot of every input and skips (SKIP_UPDATE) the others. One row, equal to
    # ``positions``, when every input has one slot.
    cache_updates: np.ndarray


@dataclass(frozen=True)
class DecodeToken:
    """One token of one input, run in a batched decode step."""

    input_index: int
    token: int
    position: int
    block_table: Sequence[int]
    keep_logits: bool


@dataclass(frozen=True)
class DecodeRun:
    """Consecutive tokens of one input that decode in one step, one slot each."""

    tokens: Sequence[DecodeToken]


@dataclass(frozen=True)
class DecodeStep:
    tokens: Sequence[DecodeToken]  # at most DECODE_BATCH; one input's tokens are consecutive, in order


@dataclass(frozen=True)
class PrefillChunk:
    """A run of tokens of one input starting on a block boundary, run as one prefill forward."""

    input_index: int
    tokens: Sequence[int]
    start: int
    block_table: Sequence[int]
    keep_logits: bool  # the logits of the chunk's last token (or of every token, with all_rows)
    all_rows: bool


def _pieces(index: int, step: StepInput, max_prefill_tokens: int) -> list[DecodeRun | PrefillChunk]:
    """An input as device work, in token order.

    A single token decodes; a run starting on a block boundary prefills, a chunk of up to
    ``max_prefill_tokens`` per forward. A run starting inside a block (a verification of drafts, a prompt
    split off a boundary by the scheduler) cannot prefill from there, since ``paged_fill_cache`` fills
    whole blocks: it decodes in one step, one slot per token at consecutive positions, when it fits the
    DECODE_BATCH slots; a longer one decodes up to the next boundary in one step and prefills the rest.
    Which rows each piece keeps follows ``all_logits``: every token's, or the input's last token's.
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

    inside_block = start % BLOCK_TOKENS != 0
    if n == 1 or (inside_block and n <= DECODE_BATCH):
        decoded = n
    else:
        decoded = -start % BLOCK_TOKENS
    pieces: list[DecodeRun | PrefillChunk] = []
    if decoded:
        pieces.append(
            DecodeRun(
                [DecodeToken(index, tokens[j], start + j, step.block_table, keep(j)) for j in range(decoded)]
            )
        )
    for offset in range(decoded, n, max_prefill_tokens):
        end = min(n, offset + max_prefill_tokens)
        pieces.append(
            PrefillChunk(
                index, tokens[offset:end], start + offset, step.block_table, keep(end - 1), step.all_logits
            )
        )
    return pieces


def _decode_steps(runs: Sequence[DecodeRun]) -> list[DecodeStep]:
    """Runs packed in order into steps of at most DECODE_BATCH slots; a run is never split, so all its
    tokens go through one forward."""
    slots: list[list[DecodeToken]] = [[]]
    for run in runs:
        if len(slots[-1]) + len(run.tokens) > DECODE_BATCH:
            slots.append([])
        slots[-1].extend(run.tokens)
    return [DecodeStep(tokens) for tokens in slots]


def plan_steps(
    inputs: Sequence[StepInput], max_prefill_tokens: int = MAX_PREFILL_TOKENS
) -> list[DecodeStep | PrefillChunk]:
    """The device work of one ``run()``, in an order that keeps each input's tokens in sequence.

    Each round packs every input whose next piece is a decode run into decode steps of up to DECODE_BATCH
    slots; when no input waits on a decode, each runs its next prefill chunk. So the common cases are one
    batched decode step for up to 32 sequences (or fewer with drafts to verify), and one prefill per
    prompt.
    """
    queues = [_pieces(i, step, max_prefill_tokens) for i, step in enumerate(inputs)]
    steps: list[DecodeStep | PrefillChunk] = []
    while any(queues):
        runs: list[DecodeRun] = []
        for queue in queues:
            front = queue[0] if queue else None
            if isinstance(front, DecodeRun):
                runs.append(front)
                queue.pop(0)
        if runs:
            steps.extend(_decode_steps(runs))
            continue
        for queue in queues:
            if queue:
                chunk = queue.pop(0)
                assert isinstance(chunk, PrefillChunk), "no input waits on a decode run this round"
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
