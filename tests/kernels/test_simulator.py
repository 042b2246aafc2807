"""The TT-Lang kernels in TT-Lang's functional simulator (tt-lang-sim), against their torch goldens.

Every kernel runs over several shapes: single tiles, multi-tile blocks, ragged rows padded to a tile row, and
grids of 1 to 6 nodes, including grids with more nodes than work (idle nodes) and nodes with several units
of work. The simulator runs the reader, compute and writer threads of every node with real dataflow-buffer
semantics (a block waited on before it is pushed, or never popped, fails the run). It computes in float32,
so the tolerances are float32 rounding (reduction order), not bfloat16's: these tests prove the data flow
and the math, not the card's precision (that is the hardware tier's, ``test_hardware.py``).

The simulator runs in one worker process for the module (``ttedge.kernels.simulation``): importing it
rebinds ``torch.bfloat16`` process-wide.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ttedge.kernels import footprint, golden
from ttedge.kernels.simulation import KernelCase, Simulator, SimulatorRun
from ttedge.models.llama.tt.rope_tables import head_rotation, interleaved_cos_sin
from ttedge.perf.hardware import WORMHOLE_N150

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    if importlib.util.find_spec("ttl") is None:
        pytest.fail("tt-lang-sim is not installed: `bash scripts/setup.sh --dev` installs it")
    with Simulator() as session:
        yield session


def traffic(run: SimulatorRun) -> dict[str, tuple[int, int]]:
    return {t.tensor: (t.tiles_read, t.tiles_written) for t in run.traffic}


@pytest.mark.parametrize(
    ("rows", "hidden", "grid"),
    [
        (32, 64, (1, 1)),
        (40, 576, (1, 2)),  # SmolLM2's hidden (18 tiles a block), 40 rows padded to 64
        (96, 256, (2, 2)),  # 3 tile rows on 4 nodes: one node idle
        (160, 128, (2, 2)),  # 5 tile rows on 4 nodes: 2, 2, 1 and an idle node
    ],
)
def test_residual_rmsnorm(simulator: Simulator, rows: int, hidden: int, grid: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(rows + hidden)
    x, residual = torch.randn(2, rows, hidden, generator=generator)
    weight = torch.rand(hidden, generator=generator) + 0.5
    run = simulator.run(
        KernelCase("residual_rmsnorm", grid, {"x": x, "residual": residual, "weight": weight}, {"eps": 1e-5})
    )
    h, y = golden.residual_rmsnorm(x, residual, weight, 1e-5)
    torch.testing.assert_close(run.outputs[0], h, **TOLERANCE)
    torch.testing.assert_close(run.outputs[1], y, **TOLERANCE)
    # x and residual read once, h and y written once; the weight once per node with work.
    row_tiles = -(-rows // 32)
    tiles = row_tiles * hidden // 32
    rows_per_node = -(-row_tiles // (grid[0] * grid[1]))
    working_nodes = -(-row_tiles // rows_per_node)
    assert traffic(run) == {
        "x": (tiles, 0),
        "residual": (tiles, 0),
        "weight": (working_nodes * hidden // 32, 0),
        "h_out": (0, tiles),
        "y_out": (0, tiles),
    }


@pytest.mark.parametrize(
    ("rows", "cols", "grid", "block"),
    [
        (32, 32, (1, 1), (1, 1)),
        (64, 384, (2, 2), (1, 3)),
        (96, 128, (2, 3), (3, 2)),  # 2 blocks of 3 x 2 tiles on 6 nodes
        (100, 256, (1, 4), (1, 2)),  # ragged rows
    ],
)
def test_swiglu(
    simulator: Simulator, rows: int, cols: int, grid: tuple[int, int], block: tuple[int, int]
) -> None:
    generator = torch.Generator().manual_seed(rows * cols)
    gate, up = torch.randn(2, rows, cols, generator=generator)
    run = simulator.run(
        KernelCase("swiglu", grid, {"gate": gate, "up": up}, {"block_rows": block[0], "block_cols": block[1]})
    )
    torch.testing.assert_close(run.outputs[0], golden.swiglu(gate, up), **TOLERANCE)
    tiles = -(-rows // 32) * cols // 32
    assert traffic(run) == {"gate": (tiles, 0), "up": (tiles, 0), "out": (0, tiles)}


def rope_tables(rows: int, head_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 4096, (rows,), generator=generator).float()
    inverse = 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None] * inverse[None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize(
    ("rows", "heads", "head_dim", "grid"),
    [
        (32, 9, 64, (2, 2)),  # SmolLM2's query heads, one decode step of 32 users
        (64, 3, 32, (1, 3)),  # one-tile heads: the halves are not whole tiles
        (40, 2, 128, (2, 3)),  # 4 units on 6 nodes
    ],
)
def test_rotary(simulator: Simulator, rows: int, heads: int, head_dim: int, grid: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(rows * heads)
    x = torch.randn(rows, heads * head_dim, generator=generator)
    cos, sin = rope_tables(rows, head_dim, generator)
    run = simulator.run(KernelCase("rotary", grid, {"x": x, "cos": cos, "sin": sin}, {"head_dim": head_dim}))
    torch.testing.assert_close(run.outputs[0], golden.rotary(x, cos, sin, head_dim), **TOLERANCE)


@pytest.mark.parametrize(("heads", "head_dim"), [(9, 64), (4, 128)])
def test_rotary_with_the_tt_ports_rotation(simulator: Simulator, heads: int, head_dim: int) -> None:
    """The kernel given the TT port's inputs (its transformation matrix on each tile of a head, Meta-order
    tables) computes its golden with that rotation, which test_rotary_meta_order.py ties to the reference."""
    generator = torch.Generator().manual_seed(heads)
    x = torch.randn(32, heads * head_dim, generator=generator)
    positions = torch.randint(0, 4096, (32,), generator=generator).numpy()
    inverse = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    cos, sin = (torch.from_numpy(t).float() for t in interleaved_cos_sin(inverse, positions))
    rotation = torch.from_numpy(head_rotation(head_dim))
    inputs = {"x": x, "cos": cos, "sin": sin, "rotation": rotation}
    run = simulator.run(KernelCase("rotary", (2, 2), inputs, {"head_dim": head_dim}))
    torch.testing.assert_close(run.outputs[0], golden.rotary(x, cos, sin, head_dim, rotation), **TOLERANCE)


def drafts_with_known_acceptance(
    batch: int, k: int, vocab: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts that agree with the target up to a random position per sequence (every length 0..k)."""
    target = torch.randint(0, vocab, (batch, k + 1), generator=generator)
    # Drafts after the first rejection still match: the count must stop at the first rejection all the same.
    draft = target[:, :k].clone()
    first_rejected = torch.randint(0, k + 1, (batch,), generator=generator)
    first_rejected[:2] = torch.tensor([0, k])  # at least one sequence accepts nothing, one everything
    for sequence, position in enumerate(first_rejected.tolist()):
        if position < k:
            draft[sequence, position] = (target[sequence, position] + 1) % vocab
    return draft, target


@pytest.mark.parametrize(
    ("batch", "k", "grid"),
    [
        (5, 4, (1, 1)),
        (70, 7, (2, 2)),  # 3 tile rows of sequences on 4 nodes
        (33, 40, (1, 2)),  # 40 drafts: two tile columns, the prefix scan crosses a tile
    ],
)
def test_speculative_acceptance(simulator: Simulator, batch: int, k: int, grid: tuple[int, int]) -> None:
    # Token ids of a Llama-3 vocabulary, well past bfloat16's exact range.
    draft, target = drafts_with_known_acceptance(batch, k, 128_256, torch.Generator().manual_seed(batch))
    run = simulator.run(KernelCase("speculative_acceptance", grid, {"draft": draft, "target_argmax": target}))
    expected = golden.accepted_lengths(draft, target)
    assert set(expected.tolist()) > {0, k}  # no, full and partial acceptance
    assert torch.equal(run.outputs[0], expected)


def test_acceptance_golden_matches_speculative_verify() -> None:
    """The golden is the greedy loop of ``ttedge.collab.speculative.verify``, written per sequence here."""
    draft, target = drafts_with_known_acceptance(64, 6, 1000, torch.Generator().manual_seed(0))
    for row_draft, row_target, accepted in zip(
        draft.tolist(), target.tolist(), golden.accepted_lengths(draft, target).tolist(), strict=True
    ):
        loop = 0
        while loop < len(row_draft) and row_draft[loop] == row_target[loop]:
            loop += 1
        assert accepted == loop


@pytest.mark.parametrize("block", [(1, 1), (2, 3)])
def test_swiglu_footprint_is_what_the_simulator_allocates(
    simulator: Simulator, block: tuple[int, int]
) -> None:
    inputs = {"gate": torch.ones(64, 96), "up": torch.ones(64, 96)}
    params = {"block_rows": block[0], "block_cols": block[1]}
    swiglu = simulator.run(KernelCase("swiglu", (1, 1), inputs, params))
    assert swiglu.l1_bytes_per_node == footprint.swiglu_l1_bytes(*block) == 6 * block[0] * block[1] * 2048


def test_norm_footprint_is_what_the_simulator_allocates(simulator: Simulator) -> None:
    """SmolLM2's fused norm fits a core's L1 with room to spare, a 2048-wide hidden (Llama-3.2-1B) does not:
    beyond that width the port keeps ttnn's norm (``ttedge.models.llama.tt.ttlang``)."""

    def norm_l1(hidden: int) -> int:
        inputs = {
            "x": torch.ones(32, hidden),
            "residual": torch.ones(32, hidden),
            "weight": torch.ones(hidden),
        }
        run = simulator.run(KernelCase("residual_rmsnorm", (1, 1), inputs, {"eps": 1e-5}))
        assert run.l1_bytes_per_node == footprint.residual_rmsnorm_l1_bytes(hidden)
        return run.l1_bytes_per_node

    assert norm_l1(576) < WORMHOLE_N150.dataflow_buffer_budget_bytes / 2
    assert norm_l1(2048) > WORMHOLE_N150.dataflow_buffer_budget_bytes


def test_unknown_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernel 'layernorm'"):
        KernelCase("layernorm", (1, 1), {})
