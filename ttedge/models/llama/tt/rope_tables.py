"""The port's rotary convention in plain numpy, importable without ttnn: Meta's interleaved pair order.

``rotary_embedding_llama`` computes ``x * cos + (x @ T) * sin`` tile by tile, where ``T`` is a 32 x 32 matrix
with ``T[2i, 2i+1] = 1`` and ``T[2i+1, 2i] = -1``: each adjacent pair ``(a, b)`` becomes ``(-b, a)``. So cos
and sin are given per pair, repeated for both members, and Q/K weights are permuted to match
(``hf_to_meta_rows``). Tables are computed in float64 on the host, with the same rope scaling as the torch
reference.

These live apart from ``rope.py`` and ``weights.py`` (which import ttnn) so that the default CPU tier can
check, with the TT-Lang rotary kernel's golden, that the kernel computes the port's rotation from the port's
own tables (``tests/kernels/test_rotary_meta_order.py``).
"""

from __future__ import annotations

import math

import numpy as np

from ttedge.config import ModelConfig
from ttedge.kernels.footprint import TILE


def hf_to_meta_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K weight ``[num_heads * head_dim, in]`` from rotate-half to interleaved
    pairs: Meta row ``2i + half`` of a head is Hugging Face row ``half * head_dim / 2 + i``."""
    rows, cols = w.shape
    head_dim = rows // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def inverse_frequencies(config: ModelConfig, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Per-pair rotation frequencies with rope scaling, as ``reference.rope_inverse_frequencies``."""
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    if freq_factors is not None:
        return inv_freq / freq_factors
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= original / scaling.high_freq_factor) & (
        wavelen <= original / scaling.low_freq_factor
    )
    return np.where(is_medium, smoothed, scaled)


def interleaved_cos_sin(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[len(positions), head_dim]`` with each pair's value repeated: ``c0 c0 c1 c1 ...``."""
    angles = np.repeat(np.outer(positions.astype(np.float64), inv_freq), 2, axis=-1)
    return np.cos(angles), np.sin(angles)


def transformation_matrix() -> np.ndarray:
    """The kernel's 32 x 32 pair-rotation matrix (tt_transformers' ``get_rot_transformation_mat``)."""
    t = np.zeros((TILE, TILE), np.float32)
    t[np.arange(0, TILE, 2), np.arange(1, TILE, 2)] = 1.0
    t[np.arange(1, TILE, 2), np.arange(0, TILE, 2)] = -1.0
    return t


def head_rotation(head_dim: int) -> np.ndarray:
    """``[head_dim, head_dim]``: ``transformation_matrix`` on each 32-wide tile of a head, as
    ``rotary_embedding_llama`` applies it; the rotation input of the TT-Lang ``rotary`` kernel, which takes
    the whole head's matrix."""
    if head_dim % TILE:
        raise ValueError(f"head_dim {head_dim} is not a whole number of {TILE}-wide tiles")
    return np.kron(np.eye(head_dim // TILE, dtype=np.float32), transformation_matrix())
