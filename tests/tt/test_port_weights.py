"""Host-only checks of the port's weight preparation (ttedge.models.llama.tt.weights); no device is opened.

- The Q/K row permutation plus the rotation ``rotary_embedding_llama`` computes (adjacent pairs turned by
  its 32 x 32 transformation matrix, with interleaved cos/sin) gives the same queries, keys and attention
  scores as the torch reference's rotate-half rope on the un-permuted weights: the weight preparation is
  right, whatever the device does.
- Block-float rounding of the prepared weights by ttnn's own host conversion, measured per tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import ttnn

from tests.tt.conftest import MOCK_DIR
from tests.tt.support import SMOLLM2, TINY, random_weights
from ttedge.config import ModelConfig, RopeScaling
from ttedge.model_zoo import PrecisionPreset, find_card
from ttedge.models.llama.tt.rope_tables import (
    hf_to_meta_rows,
    interleaved_cos_sin,
    inverse_frequencies,
    transformation_matrix,
)
from ttedge.models.llama.tt.weights import (
    WeightDtypes,
    host_tensor,
    prepare_layer,
    prepare_outer,
)

LLAMA3_SCALED = dataclasses.replace(
    TINY,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(kind="llama3", factor=32.0, original_max_position_embeddings=64),
)


def rotate_half_rope(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """``reference.RotaryEmbedding.__call__`` in numpy: halves ``(j, j + d/2)`` rotated together."""
    cos, sin = np.cos(np.concatenate([angles, angles], -1)), np.sin(np.concatenate([angles, angles], -1))
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def kernel_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """What ``rotary_embedding_llama`` defines: ``x * cos + (x @ T) * sin``, T applied to each 32-wide tile
    of the head dimension."""
    tiles = x.reshape(*x.shape[:-1], -1, 32) @ transformation_matrix().astype(np.float64)
    return x * cos[:, None] + tiles.reshape(x.shape) * sin[:, None]


@pytest.mark.parametrize("config", [SMOLLM2, TINY, LLAMA3_SCALED], ids=lambda c: c.name)
def test_meta_permutation_with_the_kernels_rotation_equals_rotate_half(config: ModelConfig) -> None:
    weights = {k: v.astype(np.float64) for k, v in random_weights(config, num_layers=1).items()}
    layer = prepare_layer(config, weights, 0)
    tokens = 5
    x = np.random.default_rng(3).standard_normal((tokens, config.hidden_size))
    positions = np.array([0, 1, 31, 32, 4000])
    inv_freq = inverse_frequencies(config)
    heads, kv_heads, d = config.num_heads, config.num_kv_heads, config.head_dim

    # Reference: un-permuted HF weights, rotate-half.
    q_ref = rotate_half_rope(
        (x @ weights["layers.0.attn.q.weight"].T).reshape(tokens, heads, d), np.outer(positions, inv_freq)
    )
    k_ref = rotate_half_rope(
        (x @ weights["layers.0.attn.k.weight"].T).reshape(tokens, kv_heads, d), np.outer(positions, inv_freq)
    )
    # Port: the fused, permuted, transposed QKV weight, the kernel's rotation with interleaved tables.
    qkv = x @ layer.wqkv
    cos, sin = interleaved_cos_sin(inv_freq, positions)
    q = kernel_rope(qkv[:, : config.q_size].reshape(tokens, heads, d), cos, sin)
    k = kernel_rope(
        qkv[:, config.q_size : config.q_size + config.kv_size].reshape(tokens, kv_heads, d), cos, sin
    )
    v = qkv[:, config.q_size + config.kv_size :]

    # Element for element, the port's heads are the reference's in Meta pair order ...
    def to_meta(t: np.ndarray, n: int) -> np.ndarray:
        return hf_to_meta_rows(t.reshape(tokens, n * d).T, n).T.reshape(tokens, n, d)

    np.testing.assert_allclose(q, to_meta(q_ref, heads), atol=1e-12)
    np.testing.assert_allclose(k, to_meta(k_ref, kv_heads), atol=1e-12)
    # ... so every attention score q . k (grouped heads) is the reference's, and V is untouched.
    group = heads // kv_heads
    scores = np.einsum("thd,shd->hts", q, np.repeat(k, group, axis=1))
    scores_ref = np.einsum("thd,shd->hts", q_ref, np.repeat(k_ref, group, axis=1))
    np.testing.assert_allclose(scores, scores_ref, atol=1e-10)
    np.testing.assert_allclose(v, x @ weights["layers.0.attn.v.weight"].T, atol=1e-12)


@pytest.mark.parametrize("config", [TINY, LLAMA3_SCALED], ids=lambda c: c.name)
def test_rotation_against_the_torch_reference(config: ModelConfig) -> None:
    """The same identity against ``reference.RotaryEmbedding`` itself (and its rope scaling); runs only
    where torch is installed (`setup_tt.sh --with-torch`, see docs/tt-validation.md)."""
    torch = pytest.importorskip("torch", reason="needs torch: bash scripts/setup_tt.sh --with-torch")
    from ttedge.models.llama.reference import RotaryEmbedding, rope_inverse_frequencies

    reference_freq = rope_inverse_frequencies(config).double().numpy()
    np.testing.assert_allclose(inverse_frequencies(config), reference_freq, rtol=1e-6)
    rope = RotaryEmbedding(torch.from_numpy(reference_freq), 4096, torch.float64)
    positions = np.array([0, 7, 4095])
    x = np.random.default_rng(4).standard_normal((3, config.num_heads, config.head_dim))
    expected = rope(
        torch.from_numpy(x), rope.cos[positions].unsqueeze(1), rope.signed_sin[positions].unsqueeze(1)
    )
    meta = hf_to_meta_rows(x.reshape(3, -1).T, config.num_heads).T.reshape(x.shape)
    cos, sin = interleaved_cos_sin(reference_freq, positions)
    got = kernel_rope(meta, cos, sin)
    want = hf_to_meta_rows(expected.numpy().reshape(3, -1).T, config.num_heads).T.reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_dtypes_follow_the_card_presets() -> None:
    performance = card_preset_of("llama-3.1-8b-instruct", "performance")
    # w2 stays at bfloat8_b when gate/up drop to bfloat4_b; the card's layer override lifts layer 31.
    assert WeightDtypes.from_preset(performance, 0) == WeightDtypes(
        attention=ttnn.bfloat8_b, w1_w3=ttnn.bfloat4_b, w2=ttnn.bfloat8_b, kv_cache=ttnn.bfloat8_b
    )
    assert WeightDtypes.from_preset(performance, 31).w1_w3 == ttnn.bfloat8_b
    accuracy = WeightDtypes.from_preset(card_preset_of("smollm2-135m-instruct", "accuracy"), 0)
    assert accuracy == WeightDtypes(
        attention=ttnn.bfloat16, w1_w3=ttnn.bfloat16, w2=ttnn.bfloat16, kv_cache=ttnn.bfloat16
    )


def card_preset_of(name: str, preset: str) -> PrecisionPreset:
    card = find_card(name)
    assert card is not None and card.tt is not None
    return card.tt.preset(preset)


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("dtype_name,min_pcc", [("bfloat8_b", 0.9999), ("bfloat4_b", 0.99)])
def test_block_float_round_trip_of_prepared_weights(
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
    dtype_name: str,
    min_pcc: float,
) -> None:
    # ttnn's host block-float conversion needs a cluster descriptor even with no device opened.
    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "n150.yaml"))
    weights = random_weights(SMOLLM2, num_layers=1)
    layer = prepare_layer(SMOLLM2, weights, 0)
    tensors = {
        "wqkv": layer.wqkv,
        "wo": layer.wo,
        "w1": layer.w1,
        "w3": layer.w3,
        "w2": layer.w2,
        "lm_head": prepare_outer(SMOLLM2, weights).lm_head,
    }
    dtype = getattr(ttnn, dtype_name)
    for name, array in tensors.items():
        back = host_tensor(array, dtype).to_numpy()
        err = np.abs(back - array)
        quality = pcc(back, array)
        rel = float(np.linalg.norm(back - array) / np.linalg.norm(array))
        record_property(f"{dtype_name} {name}", f"pcc {quality:.6f} max_abs {err.max():.2e} rel_l2 {rel:.2e}")
        print(
            f"{dtype_name} {name:8s} {array.shape}: pcc {quality:.6f}, max abs {err.max():.2e}, rel {rel:.2e}"
        )
        assert back.shape == array.shape
        assert quality > min_pcc, name
