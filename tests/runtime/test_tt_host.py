"""The TT backend's host side (ttedge.runtime.tt_host), which needs neither ttnn nor a card: block tables
as device page tables, the plan of a step (batched decodes, prefill chunks), output rows, KV
budget, and the checks that make `--device tt` fail with one clear line where it cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.tiny_checkpoints import tiny_config
from ttedge.cli import main
from ttedge.config import ConfigError
from ttedge.model_zoo import find_card
from ttedge.runtime import kv_cache, tt_host
from ttedge.runtime.base import DeviceUnavailable, StepInput
from ttedge.runtime.tt_host import (
    DECODE_BATCH,
    DEFAULT_PRESET,
    DecodeStep,
    DecodeToken,
    OutputRows,
    PageTables,
    PrefillChunk,
    check_tt_device,
    choose_preset,
    kv_cache_blocks,
    mesh_plan,
    plan_steps,
    resolve_mesh,
)


def test_block_size_agrees_with_the_kv_cache() -> None:
    assert tt_host.BLOCK_TOKENS == kv_cache.BLOCK_SIZE


def test_page_table_rows_pad_with_the_scratch_block() -> None:
    pages = PageTables(num_blocks=10, blocks_per_user=4)
    assert pages.scratch == 10 and pages.device_blocks == 11
    row = pages.row([7, 2])
    assert row.dtype == np.int32 and row.tolist() == [7, 2, 10, 10]
    assert pages.row([]).tolist() == [10] * 4
    with pytest.raises(ValueError, match="exceeds the 4 a sequence may hold"):
        pages.row([0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        pages.row([3, 10])  # the scratch block is no sequence's
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        pages.row([-1])


def test_decode_batch_fills_slots_in_order_and_pads_the_rest() -> None:
    pages = PageTables(num_blocks=10, blocks_per_user=3)
    tokens = [DecodeToken(0, 5, 40, [4, 1], True), DecodeToken(1, 9, 3, [8], True)]
    batch = pages.decode_batch(tokens)
    assert batch.tokens.dtype == np.uint32 and batch.tokens.shape == (DECODE_BATCH,)
    assert batch.tokens[:3].tolist() == [5, 9, 0]
    assert batch.positions.dtype == np.int32 and batch.positions[:3].tolist() == [40, 3, 0]
    assert batch.page_table.shape == (DECODE_BATCH, 3)
    assert batch.page_table[:2].tolist() == [[4, 1, 10], [8, 10, 10]]
    # Padded slots write position 0 of the scratch block, which no sequence reads.
    assert (batch.page_table[2:] == 10).all() and (batch.positions[2:] == 0).all()
    with pytest.raises(ValueError, match="1 to 32 users"):
        pages.decode_batch([tokens[0]] * 33)


def test_slots_of_one_sequence_update_the_cache_in_waves() -> None:
    """Two slots of one sequence never update the cache together (their rows share tiles): wave w writes
    the w-th slot of every sequence and skips the rest. Padded slots write with the first wave."""
    pages = PageTables(num_blocks=10, blocks_per_user=3)
    tokens = [
        DecodeToken(0, 5, 40, [4, 1], True),
        DecodeToken(0, 6, 41, [4, 1], True),
        DecodeToken(0, 7, 42, [4, 1], True),
        DecodeToken(1, 9, 3, [8], True),
        DecodeToken(2, 2, 62, [0, 2, 3], True),
        DecodeToken(2, 3, 63, [0, 2, 3], True),
    ]
    batch = pages.decode_batch(tokens)
    skip = tt_host.SKIP_UPDATE
    assert batch.cache_updates.dtype == np.int32 and batch.cache_updates.shape == (3, DECODE_BATCH)
    assert batch.cache_updates[:, :6].tolist() == [
        [40, skip, skip, 3, 62, skip],
        [skip, 41, skip, skip, skip, 63],
        [skip, skip, 42, skip, skip, skip],
    ]
    assert (batch.cache_updates[0, 6:] == 0).all() and (batch.cache_updates[1:, 6:] == skip).all()
    # One slot per sequence: one update, at the positions.
    single = pages.decode_batch([tokens[0], tokens[3]])
    assert single.cache_updates.tolist() == [single.positions.tolist()]


def test_single_tokens_batch_into_decode_steps_of_32() -> None:
    inputs = [StepInput([i], 20 + i % 10, [i]) for i in range(40)]
    steps = plan_steps(inputs)
    assert [type(s) for s in steps] == [DecodeStep, DecodeStep]
    assert [len(s.tokens) for s in steps if isinstance(s, DecodeStep)] == [32, 8]
    first = steps[0]
    assert isinstance(first, DecodeStep)
    assert [(t.input_index, t.token, t.position, t.keep_logits) for t in first.tokens[:2]] == [
        (0, 0, 20, True),
        (1, 1, 21, True),
    ]


def test_a_prompt_from_a_block_boundary_is_one_prefill() -> None:
    [chunk] = plan_steps([StepInput(list(range(40)), 0, [3, 4])])
    assert chunk == PrefillChunk(0, list(range(40)), 0, [3, 4], keep_logits=True, all_rows=False)


def test_long_prompts_go_in_chunks_that_keep_only_the_last_logits() -> None:
    steps = plan_steps([StepInput(list(range(2500)), 0, list(range(79)))], max_prefill_tokens=1024)
    assert [(s.start, len(s.tokens), s.keep_logits) for s in steps if isinstance(s, PrefillChunk)] == [
        (0, 1024, False),
        (1024, 1024, False),
        (2048, 452, True),
    ]


def test_a_run_inside_a_block_decodes_in_one_step_one_slot_per_token() -> None:
    """Prefill fills whole blocks, so a run starting inside a block decodes: all of it in one step when it
    fits the 32 slots, the last token's logits kept."""
    [step] = plan_steps([StepInput(list(range(30)), 40, [1, 2, 3])])
    assert isinstance(step, DecodeStep)
    assert [(t.token, t.position) for t in step.tokens] == [(j, 40 + j) for j in range(30)]
    assert [t.keep_logits for t in step.tokens] == [False] * 29 + [True]
    assert all(t.block_table == [1, 2, 3] for t in step.tokens)
    [step] = plan_steps([StepInput([7, 8, 9], 33, [1, 2])])
    assert isinstance(step, DecodeStep)
    assert [(t.position, t.keep_logits) for t in step.tokens] == [(33, False), (34, False), (35, True)]


def test_a_longer_run_inside_a_block_decodes_to_the_boundary_then_prefills() -> None:
    first, second = plan_steps([StepInput(list(range(40)), 40, [1, 2, 3])])
    assert isinstance(first, DecodeStep)
    assert [t.position for t in first.tokens] == list(range(40, 64))
    assert not any(t.keep_logits for t in first.tokens)
    assert second == PrefillChunk(0, list(range(24, 40)), 64, [1, 2, 3], keep_logits=True, all_rows=False)


def test_verification_inside_a_block_is_one_forward_keeping_every_position() -> None:
    [step] = plan_steps([StepInput([1, 2, 3, 4], 62, [0, 1, 2], all_logits=True)])
    assert isinstance(step, DecodeStep)
    assert [(t.token, t.position, t.keep_logits) for t in step.tokens] == [
        (1, 62, True),
        (2, 63, True),
        (3, 64, True),
        (4, 65, True),
    ]
    # From a block boundary, drafts verify in a prefill chunk with every row.
    [chunk] = plan_steps([StepInput([1, 2, 3, 4], 64, [0, 1, 2], all_logits=True)])
    assert chunk == PrefillChunk(0, [1, 2, 3, 4], 64, [0, 1, 2], keep_logits=True, all_rows=True)


def test_decode_runs_pack_into_steps_of_32_slots_without_being_split() -> None:
    """Ten sequences verifying 4 tokens each (40 slots): eight runs fill the first step, two the next."""
    inputs = [StepInput([1, 2, 3, 4], 40, [i, 10 + i], all_logits=True) for i in range(10)]
    steps = plan_steps(inputs)
    assert all(isinstance(s, DecodeStep) for s in steps)
    assert [[t.input_index for t in s.tokens] for s in steps if isinstance(s, DecodeStep)] == [
        [i for i in range(8) for _ in range(4)],
        [8] * 4 + [9] * 4,
    ]
    steps = plan_steps([StepInput(list(range(30)), 40, [0, 1, 2]), StepInput(list(range(5)), 40, [3, 4])])
    assert [len(s.tokens) for s in steps if isinstance(s, DecodeStep)] == [30, 5]


def test_each_sequence_keeps_its_order_while_others_batch_with_it() -> None:
    """Sequence 1's decode rides in the same step as sequence 0's tokens up to its block boundary; sequence
    0's prefill chunk waits until they are done."""
    inputs = [StepInput(list(range(34)), 30, [0, 1, 2]), StepInput([5], 7, [4])]
    steps = plan_steps(inputs)
    assert isinstance(steps[0], DecodeStep)
    assert [(t.input_index, t.position) for t in steps[0].tokens] == [(0, 30), (0, 31), (1, 7)]
    assert isinstance(steps[1], PrefillChunk) and (steps[1].start, len(steps[1].tokens)) == (32, 32)
    assert len(steps) == 2


def test_plan_refuses_tables_too_short_for_the_tokens() -> None:
    with pytest.raises(ValueError, match="cannot hold 40 tokens"):
        plan_steps([StepInput(list(range(40)), 0, [3])])
    with pytest.raises(ValueError, match="has no tokens"):
        plan_steps([StepInput([], 0, [3])])


def test_output_rows_stack_per_input_and_check_their_count() -> None:
    inputs = [StepInput([1, 2, 3], 0, [0], all_logits=True), StepInput([4], 3, [1])]
    rows = OutputRows(inputs)
    rows.add(0, np.zeros((2, 5), np.float32))
    rows.add(1, np.ones((1, 5), np.float32))
    rows.add(0, np.full((1, 5), 2.0, np.float32))
    first, second = rows.results()
    assert first.shape == (3, 5) and first[2, 0] == 2.0 and second.tolist() == [[1.0] * 5]
    assert first.dtype == np.float32
    incomplete = OutputRows(inputs)
    incomplete.add(0, np.zeros((3, 5), np.float32))
    incomplete.add(1, np.zeros((2, 5), np.float32))
    with pytest.raises(AssertionError, match="input 1 got 2 output rows, expected 1"):
        incomplete.results()
    with pytest.raises(AssertionError, match="input 0 got 0 output rows, expected 3"):
        OutputRows(inputs).results()


def test_output_rows_collect_greedy_token_ids() -> None:
    """Greedy steps deliver one int64 token id per row; a verification's ids arrive piece by piece (decode
    tokens up to the block boundary, then a prefill chunk) and come back in token order."""
    inputs = [StepInput([1, 2, 3], 30, [0, 1], all_logits=True), StepInput([4], 3, [2])]
    rows = OutputRows(inputs)
    rows.add(0, np.array([7], np.int64))
    rows.add(1, np.array([9], np.int64))
    rows.add(0, np.array([8], np.int64))
    rows.add(0, np.array([5], np.int64))
    first, second = rows.results()
    assert first.tolist() == [7, 8, 5] and first.dtype == np.int64 and second.tolist() == [9]


def test_kv_cache_blocks_follow_the_kv_dtype() -> None:
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)  # head_dim 32
    # One block: K and V, 2 layers, 2 KV heads, one 32 x 32 tile each.
    assert kv_cache_blocks(config, "bfloat16", 8 * 2048 * 11) == 10
    assert kv_cache_blocks(config, "bfloat8_b", 8 * 1088 * 11) == 10
    with pytest.raises(ValueError, match="holds no block"):
        kv_cache_blocks(config, "bfloat16", 8 * 2048)
    # Split over two chips, each holds one KV head: a block costs a chip half as much.
    assert kv_cache_blocks(config, "bfloat16", 8 * 2048 * 11, kv_heads=1) == 21


def test_mesh_is_a_built_in_or_a_file_with_one_row_of_chips(tmp_path: Path) -> None:
    assert resolve_mesh("n150").shape == (1, 1)
    assert resolve_mesh("n300").shape == (1, 2) and not resolve_mesh("n300").is_ring
    assert resolve_mesh("t3k").shape == (1, 8) and resolve_mesh("t3k").is_ring
    with pytest.raises(ConfigError, match=r"--mesh: t3k-2x4 is 2x4: the TT port splits a model over one row"):
        resolve_mesh("t3k-2x4")
    with pytest.raises(ConfigError, match=r"--mesh: n301: not a built-in mesh \(n150, n300, t3k"):
        resolve_mesh("n301")
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        resolve_mesh(str(tmp_path / "missing.yaml"))


def test_mesh_plan_refuses_a_model_that_does_not_split() -> None:
    smollm2 = find_card("smollm2-135m-instruct")
    assert smollm2 is not None
    assert mesh_plan(resolve_mesh("n150"), smollm2.config).devices == 1
    message = "--mesh n300: smollm2-135m-instruct at TP=2: 9 query heads do not divide over 2 devices"
    with pytest.raises(ConfigError, match=message):
        mesh_plan(resolve_mesh("n300"), smollm2.config)


def test_cli_mesh_needs_device_tt(capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any model is looked for."""
    assert main(["generate", "--prompt", "hi", "--model", "/no/such/model", "--mesh", "n300"]) == 2
    assert "--mesh: splits a model over Tenstorrent chips: it needs --device tt" in capsys.readouterr().err


def test_tt_device_needs_ttnn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tt_host, "_ttnn_installed", lambda: False)
    with pytest.raises(DeviceUnavailable, match=r"needs the ttnn package \(pip install 'ttedge\[tt\]'"):
        check_tt_device()


def test_tt_device_needs_a_card(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tt_host, "_ttnn_installed", lambda: True)
    monkeypatch.delenv(tt_host.MOCK_CLUSTER_VARIABLE, raising=False)
    with pytest.raises(DeviceUnavailable, match="no Tenstorrent device found"):
        check_tt_device(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeviceUnavailable, match="no Tenstorrent device found"):
        check_tt_device(tmp_path / "empty")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "0").touch()
    check_tt_device(tmp_path / "card")
    # The TT validation tier's mock cluster stands in for a card.
    monkeypatch.setenv(tt_host.MOCK_CLUSTER_VARIABLE, "mock.yaml")
    check_tt_device(tmp_path / "absent")


@pytest.mark.parametrize(
    "command,prefix",
    [
        (["generate", "--prompt", "hi", "--device", "tt"], "--device tt"),
        (["serve", "--device", "tt"], "--device tt"),
        # A model that does not exist: the check comes before the checkpoint is looked for.
        (["convert", "--model", "/no/such/model"], "ttedge convert"),
    ],
)
@pytest.mark.parametrize("installed", [False, True])
def test_cli_tt_commands_fail_with_one_line_where_they_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: list[str],
    prefix: str,
    installed: bool,
) -> None:
    monkeypatch.setattr(tt_host, "_ttnn_installed", lambda: installed)
    monkeypatch.delenv(tt_host.MOCK_CLUSTER_VARIABLE, raising=False)
    monkeypatch.setattr(tt_host, "DEVICE_DIR", tmp_path / "no-cards")
    assert main(command) == 2
    captured = capsys.readouterr()
    expected = "needs the ttnn package" if not installed else "no Tenstorrent device found"
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"ttedge: error: {prefix}")
    assert expected in captured.err


def test_preset_is_the_cards_recommended_one_or_the_named_one() -> None:
    smollm2, llama = find_card("smollm2-135m-instruct"), find_card("llama-3.1-8b-instruct")
    assert smollm2 is not None and llama is not None
    assert choose_preset(smollm2) == smollm2.tt.preset(smollm2.tt.deployments[0].preset)
    performance = choose_preset(llama, "performance")
    assert (performance.mlp_weights, performance.attention_weights) == ("bfloat4_b", "bfloat8_b")
    with pytest.raises(ConfigError, match=r"--preset: smollm2-135m-instruct: no precision preset 'fast'"):
        choose_preset(smollm2, "fast")
    # A checkpoint no card matches: bfloat8_b throughout, and nothing else.
    assert choose_preset(None) == DEFAULT_PRESET == choose_preset(None, "default")
    assert {DEFAULT_PRESET.attention_weights, DEFAULT_PRESET.mlp_weights} == {"bfloat8_b"}
    with pytest.raises(ConfigError, match="no model card with TT presets matches this checkpoint"):
        choose_preset(None, "performance")
