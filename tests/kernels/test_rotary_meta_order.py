"""The TT-Lang ``rotary`` kernel computes the port's rotation when it is given the port's own inputs: the
transformation matrix of ``rotary_embedding_llama`` on each tile of a head (``rope_tables.head_rotation``)
and the Meta-order cos/sin tables, on Q/K heads permuted to Meta's pair order as the port's weights are.
That is what lets the port swap the kernel in for ``rotary_embedding_llama`` behind ``ttlang_kernels``
without undoing the weight permutation (``ttedge.models.llama.tt.ttlang.Rotary``).

Host only, no simulator: the kernel's math is its golden (``golden.rotary`` with a rotation matrix), which
``test_simulator.py`` checks the kernel against; the reference is ``reference.RotaryEmbedding``, in
float64, on Hugging Face-order heads.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ttedge.config import ModelConfig
from ttedge.kernels import golden
from ttedge.model_zoo import find_card
from ttedge.models.llama.reference import RotaryEmbedding, rope_inverse_frequencies
from ttedge.models.llama.tt.rope_tables import (
    head_rotation,
    hf_to_meta_rows,
    interleaved_cos_sin,
    inverse_frequencies,
    transformation_matrix,
)


def card_config(name: str) -> ModelConfig:
    card = find_card(name)
    assert card is not None, f"the model zoo lost the {name} card"
    return card.config


SMOLLM2 = card_config("smollm2-135m-instruct")  # head_dim 64: two tiles per head
LLAMA_8B = card_config("llama-3.1-8b-instruct")  # head_dim 128, llama3 rope scaling
ONE_TILE_HEADS = dataclasses.replace(SMOLLM2, name="one-tile-heads", head_dim=32, num_heads=18)
POSITIONS = torch.tensor([0, 1, 31, 32, 1000, 4095])


def meta_order(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``[tokens, heads * head_dim]`` with each head's elements in Meta pair order: what the port's
    permuted Q/K weights produce where the reference's produce ``x``."""
    return torch.from_numpy(np.ascontiguousarray(hf_to_meta_rows(x.T.numpy(), heads).T))


def reference_rope(config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """``reference.RotaryEmbedding`` (float64) on Hugging Face-order heads ``x`` ``[tokens, heads * d]``."""
    rope = RotaryEmbedding(rope_inverse_frequencies(config).double(), int(POSITIONS.max()) + 1, torch.float64)
    heads = x.view(len(POSITIONS), -1, config.head_dim)
    rotated = rope(heads, rope.cos[POSITIONS].unsqueeze(1), rope.signed_sin[POSITIONS].unsqueeze(1))
    return rotated.reshape(x.shape)


def port_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = interleaved_cos_sin(inverse_frequencies(config), POSITIONS.numpy())
    return torch.from_numpy(cos), torch.from_numpy(sin)


@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_8B, ONE_TILE_HEADS], ids=lambda c: c.name)
def test_the_kernel_with_the_ports_inputs_is_the_reference_rope_in_meta_order(config: ModelConfig) -> None:
    heads = config.num_heads
    x = torch.randn(len(POSITIONS), heads * config.head_dim, generator=torch.Generator().manual_seed(0))
    x = x.double()
    cos, sin = port_tables(config)
    rotation = torch.from_numpy(head_rotation(config.head_dim))
    got = golden.rotary(meta_order(x, heads), cos, sin, config.head_dim, rotation)
    want = meta_order(reference_rope(config, x), heads)
    # The reference builds its angles in float32 (at position 4095, up to 2.4e-4 rad of rounding, times
    # |x| up to 4), the port in float64; a wrong pair order is off by more than 0.1 (the test below).
    torch.testing.assert_close(got, want.float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("config", [SMOLLM2, ONE_TILE_HEADS], ids=lambda c: c.name)
def test_the_kernels_rotate_half_matrix_is_wrong_for_the_ports_order(config: ModelConfig) -> None:
    """The kernel's default rotation (Hugging Face's halves) with the port's Meta-order heads and tables
    does not compute the port's rope: the rotation input is what makes the swap exact."""
    heads = config.num_heads
    x = torch.randn(len(POSITIONS), heads * config.head_dim, generator=torch.Generator().manual_seed(1))
    cos, sin = port_tables(config)
    got = golden.rotary(meta_order(x, heads), cos, sin, config.head_dim)
    want = meta_order(reference_rope(config, x.double()), heads).float()
    assert (got - want).abs().max() > 0.1


def test_head_rotation_applies_the_transformation_matrix_tile_by_tile() -> None:
    np.testing.assert_array_equal(head_rotation(32), transformation_matrix())
    rotation = head_rotation(128)
    for row in range(4):
        for col in range(4):
            block = rotation[32 * row : 32 * (row + 1), 32 * col : 32 * (col + 1)]
            np.testing.assert_array_equal(block, transformation_matrix() if row == col else 0)
    with pytest.raises(ValueError, match="head_dim 48 is not a whole number of 32-wide tiles"):
        head_rotation(48)


def test_the_golden_refuses_a_rotation_of_the_wrong_size() -> None:
    x, table = torch.zeros(2, 128), torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"rotation \(32, 32\) is not \[64, 64\]"):
        golden.rotary(x, table, table, 64, torch.zeros(32, 32))
