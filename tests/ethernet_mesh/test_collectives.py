"""Collective plans simulated on numpy arrays (every device ends with what it should), and their
alpha-beta cost on hand-computed cases."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ttedge.ethernet_mesh.collectives import (
    Collective,
    CollectivePlan,
    collective_seconds,
    plan_all_gather,
    plan_all_reduce,
    plan_on_mesh,
    plan_reduce_scatter,
)
from ttedge.ethernet_mesh.topology import EXAMPLES_DIR, get_mesh

Held = list[dict[int, np.ndarray]]


def simulate(plan: CollectivePlan, held: Held) -> Held:
    """Runs the plan step by step; sends in a step read the state before it. A gather transfer copies a
    chunk the sender holds to a device that lacks it; a reduce transfer hands the sender's running sum
    over (the sender no longer holds it) and the receiver adds it to its own."""
    for step in range(1, plan.steps + 1):
        transfers = [t for t in plan.transfers if t.step == step]
        links_used = Counter((t.src, t.dst) for t in transfers)
        assert max(links_used.values()) == 1, f"step {step} sends two chunks over one link"
        sent = [(t, held[t.src].pop(t.chunk) if t.reduce else held[t.src][t.chunk]) for t in transfers]
        for t, value in sent:
            if t.reduce:
                held[t.dst][t.chunk] = held[t.dst][t.chunk] + value
            else:
                assert t.chunk not in held[t.dst], f"device {t.dst} receives chunk {t.chunk} twice"
                held[t.dst][t.chunk] = value
    return held


LINES = [(n, False) for n in (1, 2, 3, 4, 5)]
RINGS = [(n, True) for n in (3, 4, 7, 8, 32)]
DEVICE_COUNTS = LINES + RINGS


def _partials(devices: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(devices)
    return [[rng.standard_normal(6) for _ in range(devices)] for _ in range(devices)]


@pytest.mark.parametrize(("devices", "ring"), DEVICE_COUNTS)
def test_all_gather_leaves_every_chunk_everywhere(devices: int, ring: bool) -> None:
    chunks = _partials(devices)[0]
    held = simulate(plan_all_gather(devices, ring), [{k: chunks[k]} for k in range(devices)])
    for device in held:
        assert sorted(device) == list(range(devices))
        for k in range(devices):
            np.testing.assert_array_equal(device[k], chunks[k])


@pytest.mark.parametrize(("devices", "ring"), DEVICE_COUNTS)
def test_reduce_scatter_leaves_each_device_its_reduced_chunk(devices: int, ring: bool) -> None:
    partials = _partials(devices)
    held = simulate(plan_reduce_scatter(devices, ring), [dict(enumerate(p)) for p in partials])
    for k, device in enumerate(held):
        assert list(device) == [k]
        np.testing.assert_allclose(device[k], sum(p[k] for p in partials))


@pytest.mark.parametrize(("devices", "ring"), DEVICE_COUNTS)
def test_all_reduce_leaves_the_full_sum_everywhere(devices: int, ring: bool) -> None:
    partials = _partials(devices)
    held = simulate(plan_all_reduce(devices, ring), [dict(enumerate(p)) for p in partials])
    for device in held:
        for k in range(devices):
            np.testing.assert_allclose(device[k], sum(p[k] for p in partials))


@pytest.mark.parametrize(
    ("devices", "ring", "steps"),
    [(1, False, 0), (2, False, 1), (4, False, 3), (4, True, 2), (8, True, 4), (7, True, 3)],
)
def test_step_counts(devices: int, ring: bool, steps: int) -> None:
    """A line takes N-1 steps; a bidirectional ring ceil((N-1)/2)."""
    assert plan_all_gather(devices, ring).steps == steps
    assert plan_reduce_scatter(devices, ring).steps == steps
    assert plan_all_reduce(devices, ring).steps == 2 * steps


def test_rings_need_three_devices() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        plan_all_gather(2, ring=True)


def test_n300_all_reduce_cost() -> None:
    """Two chips, one link of 12.5 GB/s each way, 1 µs a step: one reduce-scatter step and one
    all-gather step, each moving half of the 1 MB."""
    mesh = get_mesh("n300")
    assert collective_seconds(Collective.ALL_REDUCE, 1e6, mesh) == pytest.approx(2 * (1e-6 + 0.5e6 / 12.5e9))


def test_t3k_ring_all_reduce_cost() -> None:
    """Eight chips in a ring, 4 + 4 steps of an eighth of 8 MB. Every step uses the two on-board pairs the
    ring crosses (one usable link, 12.5 GB/s each way), so they set its pace, not the two-link cables."""
    mesh = get_mesh("t3k")
    assert plan_on_mesh(Collective.ALL_REDUCE, mesh).ring
    assert collective_seconds(Collective.ALL_REDUCE, 8e6, mesh) == pytest.approx(8 * (1e-6 + 1e6 / 12.5e9))


def test_line_cost_is_set_by_its_slowest_link() -> None:
    """two-n300-line: links 1, 2, 1 along the line; every all-gather step uses a single-link pair."""
    mesh = get_mesh(EXAMPLES_DIR / "two-n300-line.yaml")
    assert collective_seconds(Collective.ALL_GATHER, 4e6, mesh) == pytest.approx(3 * (1e-6 + 1e6 / 12.5e9))


def test_grid_plan_runs_along_the_ring_order() -> None:
    """On the 2x4 T3K view, device k is chip order[k]: the same cost as the renumbered 1x8 view."""
    for collective in Collective:
        assert collective_seconds(collective, 1e6, get_mesh("t3k-2x4")) == pytest.approx(
            collective_seconds(collective, 1e6, get_mesh("t3k"))
        )


def test_single_chip_costs_nothing_and_plans_must_fit_the_mesh() -> None:
    assert collective_seconds(Collective.ALL_REDUCE, 1e6, get_mesh("n150")) == 0
    with pytest.raises(ValueError, match="cannot run on n300"):
        plan_all_gather(4, ring=True).seconds(1e6, get_mesh("n300"))
