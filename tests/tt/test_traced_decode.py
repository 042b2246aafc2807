"""Traced decode (ttedge.models.llama.tt.traced_decode) on mock n150 (Wormhole) and p150 (Blackhole).

Mock validation (no numerics). ttnn 0.81.1 on a mock cluster cannot capture or replay a trace: capturing
any program, and replaying even an empty trace, end the process with SIGSEGV inside tt-metal's dispatch
code (docs/tt-validation.md). What runs here is everything around the trace: the persistent input
tensors and their in-place updates (``ttnn.copy_host_to_device_tensor``, including the L1-sharded
cos/sin), the op sequence a replay runs (``Transformer.decode_on_device`` over those tensors, logits and
greedy), and ``TracedDecode``'s protocol with ttnn's three trace calls recorded instead of run -- the ops
between capture and end then run eagerly. That the replay computes what untraced decode computes is the
hardware tier's test (tests/runtime/test_tt_hardware.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ttnn

from tests.tt.support import SMOLLM2, SMOLLM2_PRESET, TINY, random_weights
from ttedge.models.llama.tt import traced_decode
from ttedge.models.llama.tt.model import DecodeTensors, Transformer
from ttedge.models.llama.tt.model_config import BATCH
from ttedge.runtime.base import StepInput
from ttedge.runtime.tt import TtDeviceRunner

CONFIGS = {"smollm2": dataclasses.replace(SMOLLM2, num_layers=2), "tiny": TINY}
NUM_BLOCKS = 16
BLOCKS_PER_USER = 4
CONTEXT = BLOCKS_PER_USER * 32


def step_arrays(seed: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens, positions and page table of one decode step for BATCH users, different per seed."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, BATCH).astype(np.uint32)
    positions = rng.integers(0, CONTEXT, BATCH).astype(np.int32)
    page_table = rng.integers(0, NUM_BLOCKS, (BATCH, BLOCKS_PER_USER)).astype(np.int32)
    return tokens, positions, page_table


def addresses(tensors: DecodeTensors) -> list[int]:
    return [getattr(tensors, f.name).buffer_address() for f in dataclasses.fields(tensors)]


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_persistent_inputs_update_in_place_and_feed_the_replayed_ops(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, name: str
) -> None:
    config = CONFIGS[name]
    model = Transformer(mock_device(board), config, random_weights(config), SMOLLM2_PRESET, NUM_BLOCKS)
    inputs = model.decode_inputs_to_device(model.decode_host_inputs(*step_arrays(0, config.vocab_size)))
    assert inputs.cos.memory_config().memory_layout == ttnn.TensorMemoryLayout.HEIGHT_SHARDED
    assert inputs.cos.memory_config().buffer_type == ttnn.BufferType.L1
    placed = addresses(inputs)
    logits = model.decode_on_device(inputs)
    assert tuple(logits.shape) == (1, 1, BATCH, model.lm_head.weight.shape[-1])

    # The next steps' inputs go into the same buffers, which the same ops then read again.
    for seed in (1, 2):
        model.decode_host_inputs(*step_arrays(seed, config.vocab_size)).copy_to(inputs)
        assert addresses(inputs) == placed
        ids = model.decode_on_device(inputs, greedy=True)
        assert tuple(ids.shape) == (1, 1, BATCH) and ids.dtype == ttnn.uint32
        assert ids.layout == ttnn.ROW_MAJOR_LAYOUT

    # A step whose page table is not the persistent one's shape cannot be copied in: the library refuses.
    tokens, positions, page_table = step_arrays(3, config.vocab_size)
    wider = model.decode_host_inputs(tokens, positions, np.hstack([page_table, page_table]))
    with pytest.raises(RuntimeError, match="logical_shape"):
        wider.copy_to(inputs)


class RecordedTraceCalls:
    """Stands in for ttnn's trace calls, which crash on a mock, and records them; ops issued between
    begin and end run eagerly. Also checks that the ops between begin and end add no program to the
    device's program cache: a capture records commands and cannot load new kernel binaries, so the
    compile run before it must have built every program the captured step uses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, Any]] = []
        self.next_id = 0
        self.programs_at_begin = 0
        monkeypatch.setattr(ttnn, "begin_trace_capture", self.begin)
        monkeypatch.setattr(ttnn, "end_trace_capture", self.end)
        monkeypatch.setattr(ttnn, "execute_trace", self.execute)

    def begin(self, mesh: ttnn.MeshDevice, *, cq_id: int) -> int:
        self.next_id += 1
        self.events.append(("begin", self.next_id))
        self.programs_at_begin = mesh.num_program_cache_entries()
        return self.next_id

    def end(self, mesh: ttnn.MeshDevice, trace_id: int, *, cq_id: int) -> None:
        assert mesh.num_program_cache_entries() == self.programs_at_begin, "a program was built in capture"
        self.events.append(("end", trace_id))

    def execute(self, mesh: ttnn.MeshDevice, trace_id: int, *, cq_id: int, blocking: bool) -> None:
        assert not blocking, "the host goes on preparing while the device replays"
        self.events.append(("execute", trace_id))


@pytest.mark.parametrize("board", ["n150", "p150"])
def test_traced_decode_captures_once_per_output_kind_and_replays(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], monkeypatch: pytest.MonkeyPatch, board: str
) -> None:
    runner = TtDeviceRunner(
        mock_device(board),
        TINY,
        random_weights(TINY),
        SMOLLM2_PRESET,
        NUM_BLOCKS,
        CONTEXT,
        traced_decode=True,
    )
    traced = runner.traced_decode
    assert isinstance(traced, traced_decode.TracedDecode)
    trace = RecordedTraceCalls(monkeypatch)
    runs: list[tuple[DecodeTensors, bool]] = []
    decode_on_device = runner.model.decode_on_device

    def record_run(
        step: DecodeTensors, greedy: bool = False, cache_updates: Sequence[ttnn.Tensor] | None = None
    ) -> ttnn.Tensor:
        runs.append((step, greedy))
        trace.events.append(("ops", greedy))
        return decode_on_device(step, greedy, cache_updates)

    monkeypatch.setattr(runner.model, "decode_on_device", record_run)
    copies: list[int] = []
    copy = ttnn.copy_host_to_device_tensor

    def record_copy(host: ttnn.Tensor, device: ttnn.Tensor, *args: Any) -> None:
        copies.append(device.buffer_address())
        copy(host, device, *args)

    monkeypatch.setattr(ttnn, "copy_host_to_device_tensor", record_copy)
    tables = [[7, 2], [11, 0, 5], [3, 4]]

    def step(position: int) -> list[StepInput]:
        return [StepInput([9], position + u, table) for u, table in enumerate(tables)]

    # The first logits step: a compile run, then the capture (ops recorded between begin and end), then
    # a replay. The persistent inputs were allocated with this step's values: nothing is copied.
    out = runner.forward(step(40))
    assert [o.shape for o in out] == [(1, TINY.vocab_size)] * 3
    assert trace.events == [("ops", False), ("begin", 1), ("ops", False), ("end", 1), ("execute", 1)]
    assert not copies
    logits_output = traced.traces[False][1]

    # Later logits steps: copy the five inputs in place, replay; no op is issued, no capture made.
    trace.events.clear()
    runner.forward(step(41))
    runner.forward(step(42))
    assert trace.events == [("execute", 1), ("execute", 1)]
    assert traced.inputs is not None and copies == addresses(traced.inputs) * 2
    assert traced.traces[False][1] is logits_output

    # The first greedy step captures the greedy trace over the same inputs; then it replays too.
    trace.events.clear()
    ids = runner.greedy_tokens(step(43))
    runner.greedy_tokens(step(44))
    assert [i.shape for i in ids] == [(1,)] * 3
    assert trace.events == [
        ("ops", True),
        ("begin", 2),
        ("ops", True),
        ("end", 2),
        ("execute", 2),
        ("execute", 2),
    ]
    assert all(inputs is traced.inputs for inputs, _ in runs)
    assert tuple(traced.traces[True][1].shape) == (1, 1, BATCH)

    # Drafts verified inside a block (several cache updates) run untraced: ops, no capture, no replay.
    trace.events.clear()
    out = runner.forward([StepInput([1, 2, 3], 45, tables[0], all_logits=True)])
    assert [o.shape for o in out] == [(3, TINY.vocab_size)]
    assert trace.events == [("ops", False)] and runs[-1][0] is not traced.inputs


def test_runner_decodes_untraced_on_a_mock_cluster(
    mock_device: Callable[[str | Path], ttnn.MeshDevice],
) -> None:
    runner = TtDeviceRunner(
        mock_device("n150"), TINY, random_weights(TINY), SMOLLM2_PRESET, NUM_BLOCKS, CONTEXT
    )
    assert runner.traced_decode is None
