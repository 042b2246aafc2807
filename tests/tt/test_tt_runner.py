"""The TT backend's device path (ttedge.runtime.tt.TtDeviceRunner, what TtModelRunner.run calls) on mock
n150 (Wormhole) and p150 (Blackhole): prompts prefilled, a prompt continued from a block boundary
(chunked prefill over the cache) and from inside a block, drafts verified with every position's logits,
and batched decode steps for several users with their own block tables.

Mock validation (no numerics): ttnn checks every op and allocates every buffer; the logits read back are
zeros, so these tests check what reaches the device (page tables, positions, chunks) and the shape of
what comes back, never the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ttnn

from tests.tt.support import SMOLLM2, SMOLLM2_PRESET, TINY, random_weights
from ttedge.config import ModelConfig
from ttedge.models.llama.tt import model_config
from ttedge.runtime import tt_host
from ttedge.runtime.base import StepInput, VerifiesGreedyOnDevice
from ttedge.runtime.tt import TtDeviceRunner

# SmolLM2's shapes with two of its 30 layers: every op shape is the real model's, and the whole-model
# decode over 30 layers is test_port_model's job.
CONFIGS = {"smollm2": dataclasses.replace(SMOLLM2, num_layers=2), "tiny": TINY}
CONTEXT = 128  # 4 blocks per user
NUM_BLOCKS = 16


def test_host_constants_agree_with_the_port() -> None:
    assert tt_host.DECODE_BATCH == model_config.BATCH
    assert tt_host.BLOCK_TOKENS == model_config.BLOCK_TOKENS
    assert tt_host.MAX_PREFILL_TOKENS == model_config.MAX_PREFILL_TOKENS


class DeviceCalls:
    """Records what the runner hands the model (then runs the model's own method)."""

    def __init__(self, runner: TtDeviceRunner, monkeypatch: pytest.MonkeyPatch):
        self.decodes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.prefills: list[tuple[np.ndarray, np.ndarray, int, bool]] = []
        self.greedy: list[bool] = []  # per call, decode or prefill
        self.waves: list[int] = []  # cache updates per decode call
        model = runner.model
        decode, prefill = model.decode, model.prefill

        def record_decode(
            tokens: np.ndarray,
            positions: np.ndarray,
            page_table: np.ndarray,
            greedy: bool = False,
            cache_updates: np.ndarray | None = None,
        ) -> Any:
            self.decodes.append((tokens.copy(), positions.copy(), page_table.copy()))
            self.greedy.append(greedy)
            self.waves.append(1 if cache_updates is None else len(cache_updates))
            return decode(tokens, positions, page_table, greedy, cache_updates)

        def record_prefill(
            tokens: np.ndarray, row: np.ndarray, start: int = 0, all_rows: bool = False, greedy: bool = False
        ) -> Any:
            self.prefills.append((tokens.copy(), row.copy(), start, all_rows))
            self.greedy.append(greedy)
            return prefill(tokens, row, start, all_rows, greedy)

        monkeypatch.setattr(model, "decode", record_decode)
        monkeypatch.setattr(model, "prefill", record_prefill)

    def clear(self) -> None:
        self.decodes.clear()
        self.prefills.clear()
        self.greedy.clear()
        self.waves.clear()


def check_logits(out: list[np.ndarray], rows: list[int], config: ModelConfig) -> None:
    assert [o.shape for o in out] == [(n, config.vocab_size) for n in rows]
    assert all(o.dtype == np.float32 for o in out)


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_runner_prefills_then_decodes_several_users(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
    monkeypatch: pytest.MonkeyPatch,
    board: str,
    name: str,
) -> None:
    config = CONFIGS[name]
    runner = TtDeviceRunner(
        mock_device(board), config, random_weights(config), SMOLLM2_PRESET, NUM_BLOCKS, CONTEXT
    )
    scratch = runner.pages.scratch
    assert scratch == NUM_BLOCKS and runner.model.layers[0].attention.k_cache.shape[0] == NUM_BLOCKS + 1
    calls = DeviceCalls(runner, monkeypatch)
    rng = np.random.default_rng(3)

    def prompt(n: int) -> list[int]:
        return rng.integers(0, config.vocab_size, n).tolist()

    # Three users with their own blocks, in the scattered order an allocator hands out after frees.
    tables = {"a": [7, 2], "b": [11, 0, 5], "c": [3]}

    # A 40-token prompt: one prefill padded to 64 rows, its K/V filled into blocks 7 and 2.
    out = runner.forward([StepInput(prompt(40), 0, tables["a"])])
    check_logits(out, [1], config)
    [(tokens, row, start, all_rows)] = calls.prefills
    assert len(tokens) == 40 and start == 0 and not all_rows
    assert row.tolist() == [7, 2, scratch, scratch]
    assert not calls.decodes

    # Two more prompts in one step: one prefill each.
    calls.clear()
    out = runner.forward([StepInput(prompt(70), 0, tables["b"]), StepInput(prompt(5), 0, tables["c"])])
    check_logits(out, [1, 1], config)
    assert [(len(t), r.tolist(), s) for t, r, s, _ in calls.prefills] == [
        (70, [11, 0, 5, scratch], 0),
        (5, [3, scratch, scratch, scratch], 0),
    ]

    # User a goes on with 40 tokens from position 40 (inside block 2): 24 tokens reach the block boundary
    # in one decode step, one slot each (24 cache updates: the slots' rows share tiles, see tt_host),
    # then a 16-token prefill chunk at 64 attends to the cache (chunked SDPA). Its third block was
    # allocated for it.
    calls.clear()
    tables["a"].append(9)
    out = runner.forward([StepInput(prompt(40), 40, tables["a"])])
    check_logits(out, [1], config)
    [(_, slots, page_table)] = calls.decodes
    assert slots[:24].tolist() == list(range(40, 64)) and (slots[24:] == 0).all()
    assert (page_table[:24] == [7, 2, 9, scratch]).all() and (page_table[24:] == scratch).all()
    assert calls.waves == [24]
    assert [(len(t), r.tolist(), s) for t, r, s, _ in calls.prefills] == [(16, [7, 2, 9, scratch], 64)]

    # Several decode steps for the three users at once: each slot gets its user's token, position and
    # page table row; the 29 padded slots write position 0 of the scratch block.
    positions = {"a": 80, "b": 70, "c": 5}
    for _ in range(3):
        calls.clear()
        step = [StepInput(prompt(1), positions[u], tables[u]) for u in ("c", "a", "b")]
        out = runner.forward(step)
        check_logits(out, [1, 1, 1], config)
        [(ids, slots, page_table)] = calls.decodes
        assert ids[:3].tolist() == [s.token_ids[0] for s in step]
        assert slots[:3].tolist() == [positions["c"], positions["a"], positions["b"]]
        assert page_table.shape == (tt_host.DECODE_BATCH, CONTEXT // tt_host.BLOCK_TOKENS)
        assert page_table[0].tolist() == [3, scratch, scratch, scratch]
        assert page_table[1].tolist() == [7, 2, 9, scratch]
        assert page_table[2].tolist() == [11, 0, 5, scratch]
        assert (page_table[3:] == scratch).all() and (slots[3:] == 0).all()
        assert calls.waves == [1]
        positions = {u: p + 1 for u, p in positions.items()}

    # Verifying 4 drafts of user b from a block boundary: one prefill chunk, every row's logits.
    calls.clear()
    tables["b"].append(1)
    out = runner.forward([StepInput(prompt(4), 96, tables["b"], all_logits=True)])
    check_logits(out, [4], config)
    assert [(len(t), s, a) for t, _, s, a in calls.prefills] == [(4, 96, True)]

    # Verifying 5 drafts of user a from inside a block (83) while user c decodes: one decode step, user
    # a's tokens in slots 0-4 at 83..87 over its page table row, c's in slot 5.
    calls.clear()
    out = runner.forward(
        [StepInput(prompt(5), 83, tables["a"], all_logits=True), StepInput(prompt(1), 8, tables["c"])]
    )
    check_logits(out, [5, 1], config)
    [(_, slots, page_table)] = calls.decodes
    assert slots[:6].tolist() == [83, 84, 85, 86, 87, 8]
    assert (page_table[:5] == [7, 2, 9, scratch]).all() and page_table[5].tolist() == [
        3,
        scratch,
        scratch,
        scratch,
    ]
    assert calls.waves == [5] and not calls.prefills


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_runner_picks_greedy_tokens_on_the_device(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
    monkeypatch: pytest.MonkeyPatch,
    board: str,
    name: str,
) -> None:
    """``greedy_tokens`` runs the same device work as ``forward`` with the argmax on the device (untilize,
    slice off the vocabulary padding, multi-core argmax) and reads back one int64 id per row: a prompt,
    a decode step for three users, and a verification from inside a block (one decode step, a slot per
    draft)."""
    config = CONFIGS[name]
    runner = TtDeviceRunner(
        mock_device(board), config, random_weights(config), SMOLLM2_PRESET, NUM_BLOCKS, CONTEXT
    )
    calls = DeviceCalls(runner, monkeypatch)
    tables = [[7, 2], [11, 0, 5], [3, 4]]

    def check_ids(out: list[np.ndarray], rows: list[int]) -> None:
        assert [o.shape for o in out] == [(n,) for n in rows]
        assert all(o.dtype == np.int64 and ((o >= 0) & (o < config.vocab_size)).all() for o in out)

    check_ids(runner.greedy_tokens([StepInput(list(range(40)), 0, tables[0])]), [1])
    check_ids(
        runner.greedy_tokens([StepInput([5], 40 + u, table) for u, table in enumerate(tables)]), [1, 1, 1]
    )
    check_ids(runner.greedy_tokens([StepInput([1, 2, 3, 4], 62, tables[1], all_logits=True)]), [4])
    assert len(calls.decodes) == 2 and len(calls.prefills) == 1  # the drafts: one decode step, 4 slots
    assert calls.greedy == [True] * 3
    calls.clear()
    check_logits(runner.forward([StepInput([5], 41, tables[1])]), [1], config)
    assert calls.greedy == [False]


def test_runner_refuses_inputs_past_the_context(mock_device: Callable[[str | Path], ttnn.MeshDevice]) -> None:
    runner = TtDeviceRunner(
        mock_device("n150"), TINY, random_weights(TINY), SMOLLM2_PRESET, NUM_BLOCKS, CONTEXT
    )
    with pytest.raises(ValueError, match="past the 128-token context"):
        runner.forward([StepInput([1, 2], CONTEXT - 1, [0, 1, 2, 3])])


def test_model_runner_hands_torch_tensors_to_the_engine(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    """Needs torch in .venv-tt (`bash scripts/setup_tt.sh --with-torch`); skipped otherwise."""
    torch = pytest.importorskip("torch", reason="TtModelRunner.run returns torch tensors: needs --with-torch")
    from ttedge.runtime.tt import TtModelRunner

    device = TtDeviceRunner(
        mock_device("n150"), TINY, random_weights(TINY), SMOLLM2_PRESET, NUM_BLOCKS, CONTEXT
    )
    runner = TtModelRunner(device)
    assert runner.allocator.num_blocks == NUM_BLOCKS and runner.max_model_len == CONTEXT
    assert runner.cheap_rows == tt_host.DECODE_BATCH
    table = runner.allocator.allocate(2)
    [logits] = runner.run([StepInput(list(range(40)), 0, table)])
    assert logits.dtype == torch.float32 and logits.shape == (1, TINY.vocab_size)
    [ids] = runner.run_greedy([StepInput([1, 2, 3], 40, table, all_logits=True)])
    assert ids.dtype == torch.int64 and ids.shape == (3,)
    # The engine verifies greedy drafts through it (mock zeros: token 0, nothing accepted).
    assert isinstance(runner, VerifiesGreedyOnDevice)
    assert runner.run_greedy_verify([StepInput([1, 2, 3], 40, table, all_logits=True)], [[2, 3]]) == [(0, 0)]
