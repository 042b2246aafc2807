"""The TT-Lang kernels compiled by tt-lang and run on a real card, against their torch goldens (hardware
tier, ``-m tt_hardware``).

The same kernel code as the simulator tests, at decode shapes of SmolLM2, on the card's full worker grid.
The card computes in bfloat16 (float32 for the acceptance kernel's token ids), so the bar is a PCC of 0.999
for the float kernels and exact counts for acceptance.

Skipped here, with the reason: this machine has no card, and tt-lang (the compiler, Python 3.12) pins ttnn
0.69.0 while the TT tier pins 0.81.1, so no environment of this repository carries both; only the simulator
(tt-lang-sim) is installed. On a card: ``pip install tt-lang`` in a Python 3.12 environment with ttedge and
pytest, then ``python -m pytest -m tt_hardware tests/kernels``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.kernels.test_simulator import drafts_with_known_acceptance, rope_tables
from tests.models.conftest_helpers import pcc
from ttedge.kernels import golden
from ttedge.runtime.base import DeviceUnavailable
from ttedge.runtime.tt_host import check_tt_device

pytestmark = pytest.mark.tt_hardware

MIN_PCC = 0.999
ROWS, HIDDEN, MLP, HEADS, HEAD_DIM = 32, 576, 1536, 9, 64


@pytest.fixture(scope="module")
def device() -> Iterator[Any]:
    if importlib.util.find_spec("ttl") is None:
        pytest.skip("hardware tier: needs tt-lang (the TT-Lang compiler), which is not installed")
    import ttl

    if ttl._SIM_ONLY_INSTALL:
        pytest.skip("hardware tier: only tt-lang-sim (the simulator) is installed; the card needs tt-lang")
    try:
        check_tt_device()
    except DeviceUnavailable as missing:
        pytest.skip(f"hardware tier: needs a Tenstorrent card ({missing})")
    from ttedge.kernels.dsl import ttnn

    opened = ttnn.open_device(device_id=0)
    yield opened
    ttnn.close_device(opened)


def full_grid(device: Any) -> tuple[int, int]:
    grid = device.compute_with_storage_grid_size()
    return (grid.y, grid.x)


def test_residual_rmsnorm(device: Any) -> None:
    from ttedge.kernels import residual_rmsnorm

    x, residual = torch.randn(2, ROWS, HIDDEN)
    weight = torch.rand(HIDDEN) + 0.5
    h, y = residual_rmsnorm.run(x, residual, weight, eps=1e-5, grid=full_grid(device), device=device)
    want_h, want_y = golden.residual_rmsnorm(x, residual, weight, 1e-5)
    assert pcc(h, want_h) >= MIN_PCC
    assert pcc(y, want_y) >= MIN_PCC


def test_swiglu(device: Any) -> None:
    from ttedge.kernels import swiglu

    gate, up = torch.randn(2, ROWS, MLP)
    out = swiglu.run(gate, up, grid=full_grid(device), device=device, block_cols=2)
    assert pcc(out, golden.swiglu(gate, up)) >= MIN_PCC


def test_rotary(device: Any) -> None:
    from ttedge.kernels import rotary

    x = torch.randn(ROWS, HEADS * HEAD_DIM)
    cos, sin = rope_tables(ROWS, HEAD_DIM, torch.Generator().manual_seed(0))
    out = rotary.run(x, cos, sin, head_dim=HEAD_DIM, grid=full_grid(device), device=device)
    assert pcc(out, golden.rotary(x, cos, sin, HEAD_DIM)) >= MIN_PCC


def test_speculative_acceptance(device: Any) -> None:
    from ttedge.kernels import speculative_acceptance

    draft, target = drafts_with_known_acceptance(32, 7, 128_256, torch.Generator().manual_seed(0))
    accepted = speculative_acceptance.run(draft, target, grid=full_grid(device), device=device)
    assert torch.equal(accepted, golden.accepted_lengths(draft, target))
