"""Weight formats of the CPU linear layers against float32/float64 matmuls of the same weights.

Worst-case bounds are derived, not tuned. Rounding an activation to bfloat16 moves it by at most
``U = 2**-9`` of itself and so does rounding the float32 accumulator to the bfloat16 output, so a
bfloat16-activation kernel computing with weights ``W`` satisfies, per output,

    |y - x @ W.T| <= U * (|x| @ |W|.T + |x @ W.T|) + (float32 accumulation) + (weight error)

where ``weight error = |x| @ |W - W_used|.T`` for whatever rounding the format adds to ``W``.
Worst cases allow for no cancellation, so RMS errors are also compared with the error of the
rounding alone (measured ratios are 1.0 for the plain formats and 1.2-1.5 where scales or weights
are rounded too; the asserted factors leave room above those).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ttedge.checkpoint.base import QuantizedBlocks, TensorSource
from ttedge.models.llama import linear
from ttedge.models.llama.linear import (
    AUTO_HEAD_INT8_MAX_ROWS,
    AUTO_INT4_MAX_ROWS,
    AutoLinear,
    BFloat16Linear,
    Int4Groups,
    Int4Linear,
    Int8Linear,
    WeightFormat,
    build_linear,
    build_lm_head,
    weight_source,
)

U = 2.0**-9  # unit roundoff of bfloat16
F32_EPS = 2.0**-24
Q4_1 = GGMLQuantizationType.Q4_1
ROWS = (1, 7, 33)
OUT, IN = 80, 256


def _weight(out: int, inp: int, seed: int) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


def _x(rows: int, inp: int, seed: int = 100) -> torch.Tensor:
    return torch.randn(rows, inp, generator=torch.Generator().manual_seed(seed))


def _q4_1(weight: torch.Tensor) -> QuantizedBlocks:
    data = quantize(weight.numpy(), Q4_1)
    return QuantizedBlocks(qtype="Q4_1", data=data, shape=tuple(weight.shape))


def _dequantized(blocks: QuantizedBlocks) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks.data, Q4_1).reshape(blocks.shape))


def _q4_1_weight_error(blocks: QuantizedBlocks) -> torch.Tensor:
    """Bound on |W_used - W| when Q4_1's d and m + 8d are rounded to bfloat16 (|q - 8| <= 8)."""
    rows, cols = blocks.shape
    raw = blocks.data.reshape(rows, cols // 32, 20)
    d = raw[..., 0:2].copy().view(np.float16).astype(np.float64)
    m = raw[..., 2:4].copy().view(np.float16).astype(np.float64)
    per_group = torch.from_numpy(U * (8 * np.abs(d) + np.abs(m + 8 * d))).squeeze(-1)
    return per_group.repeat_interleave(32, dim=1)


def _errors(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|y - x @ w.T| in float64, with |x| @ |w|.T and |x @ w.T| for bounds."""
    x64, w64 = x.double(), w.double()
    exact = x64 @ w64.T
    return (y.double() - exact).abs(), x64.abs() @ w64.abs().T, exact.abs()


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def _rounding_rms(x: torch.Tensor, w: torch.Tensor) -> float:
    """RMS error of the bfloat16 contract alone: x rounded on entry, the exact product on exit."""
    err, _, _ = _errors((x.bfloat16().double() @ w.double().T).float().bfloat16(), x, w)
    return _rms(err)


def _bf16_bound(magnitude: torch.Tensor, exact: torch.Tensor, inp: int) -> torch.Tensor:
    return U * (1 + U) * magnitude + U * exact + inp * F32_EPS * magnitude


def _effective_weight(layer: linear.Linear, source: torch.Tensor) -> torch.Tensor:
    """The float32 weights a layer really computes with."""
    if layer.fmt is WeightFormat.float32:
        return source
    if layer.fmt is WeightFormat.bfloat16:
        return source.bfloat16().float()
    if isinstance(layer, Int8Linear):
        return layer.weight.float() * layer.scale.float()[:, None]
    return Int4Groups.quantize(source).dequantize()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(
    "fmt", [WeightFormat.float32, WeightFormat.bfloat16, WeightFormat.int8, WeightFormat.int4]
)
def test_format_computes_its_weights_within_rounding(fmt: WeightFormat, rows: int) -> None:
    w = _weight(OUT, IN, seed=1)
    layer = build_linear([w], fmt)
    assert layer.fmt is fmt
    x = _x(rows, IN)
    y = layer(x)
    assert y.shape == (rows, OUT) and y.dtype == fmt.activation_dtype
    err, magnitude, exact = _errors(y, x, _effective_weight(layer, w))
    if fmt is WeightFormat.float32:
        assert bool((err <= 2 * IN * F32_EPS * magnitude).all())
        return
    bound = _bf16_bound(magnitude, exact, IN)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"
    # The worst case above allows for no cancellation; on average the kernels add nothing to it.
    assert _rms(err) < 1.1 * _rounding_rms(x, _effective_weight(layer, w))


@pytest.mark.parametrize("fmt", [WeightFormat.int8, WeightFormat.int4])
def test_quantised_weights_stay_within_half_a_step(fmt: WeightFormat) -> None:
    w = _weight(OUT, IN, seed=2)
    layer = build_linear([w], fmt)
    error = (_effective_weight(layer, w) - w).abs()
    if isinstance(layer, Int8Linear):
        step = layer.scale.float()[:, None]
    else:
        step = Int4Groups.quantize(w).scale.float().repeat_interleave(linear.GROUP_SIZE, dim=1)
    # Half a step of rounding, plus the grid moving by bfloat16 rounding of scale and zero.
    assert bool((error <= 0.5 * step * (1 + 16 * U) + U * w.abs().amax()).all())


@pytest.mark.parametrize("rows", ROWS)
def test_q4_1_repack_is_exact_up_to_bfloat16_scales(rows: int) -> None:
    original = _weight(OUT, IN, seed=3)
    blocks = _q4_1(original)
    w = _dequantized(blocks)
    layer = build_linear([blocks], WeightFormat.int4)
    x = _x(rows, IN)
    err, magnitude, exact = _errors(layer(x), x, w)
    bound = _bf16_bound(magnitude, exact, IN) + x.double().abs() @ _q4_1_weight_error(blocks).T
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"

    # In RMS the repack is about as accurate as the bfloat16 activation contract allows at all ...
    assert _rms(err) < 1.5 * _rounding_rms(x, w)
    # ... while quantising the original floats again lands about ten times further away.
    requantised, _, _ = _errors(build_linear([original], WeightFormat.int4)(x), x, w)
    assert _rms(requantised) > 5 * _rms(err)


def test_q4_1_repack_keeps_codes_that_min_max_requantisation_would_move() -> None:
    """Q4_1 from llama.cpp with an importance matrix need not span codes 0..15, so quantising the
    dequantised weights again does not recover them; the repack does."""
    rng = np.random.default_rng(4)
    codes = rng.integers(3, 13, size=(OUT, IN // 32, 32), dtype=np.uint8)
    d = rng.uniform(0.001, 0.01, size=(OUT, IN // 32, 1)).astype(np.float16)
    m = rng.uniform(-0.08, -0.02, size=(OUT, IN // 32, 1)).astype(np.float16)
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)
    data = np.concatenate([d.view(np.uint8), m.view(np.uint8), nibbles], axis=-1).reshape(OUT, -1)
    blocks = QuantizedBlocks(qtype="Q4_1", data=data, shape=(OUT, IN))
    w = _dequantized(blocks)
    x = _x(7, IN)

    repacked, magnitude, exact = _errors(build_linear([blocks], WeightFormat.int4)(x), x, w)
    requantised, _, _ = _errors(build_linear([w], WeightFormat.int4)(x), x, w)
    bound = _bf16_bound(magnitude, exact, IN) + x.double().abs() @ _q4_1_weight_error(blocks).T
    assert bool((repacked <= bound).all())
    assert _rms(requantised) > 5 * _rms(repacked)


@pytest.mark.parametrize("fmt", list(WeightFormat))
def test_fused_weights_equal_separate_linears(fmt: WeightFormat) -> None:
    q, k, v = _weight(64, IN, 5), _weight(32, IN, 6), _weight(32, IN, 7)
    fused = build_linear([q, k, v], fmt)
    separate = [build_linear([w], fmt) for w in (q, k, v)]
    assert fused.out_features == 128 and fused.in_features == IN
    for rows in ROWS:
        x = _x(rows, IN).to(fmt.activation_dtype)
        parts = fused(x).split((64, 32, 32), dim=-1)
        for part, layer in zip(parts, separate, strict=True):
            # Every output column is computed on its own, whatever its neighbours.
            torch.testing.assert_close(part, layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [WeightFormat.int8, WeightFormat.int4])
def test_quantised_kernels_are_batch_invariant(fmt: WeightFormat) -> None:
    """A row's output does not depend on the other rows: verify (many rows) equals decode (one)."""
    layer = build_linear([_weight(OUT, IN, 23)], fmt)
    x = _x(33, IN).bfloat16()
    batched = layer(x)
    for start, stop in ((0, 1), (5, 6), (3, 8), (1, 33)):
        torch.testing.assert_close(layer(x[start:stop]), batched[start:stop], rtol=0, atol=0)


@pytest.mark.parametrize("rows", ROWS)
def test_fused_q4_1_sources_stay_exact(rows: int) -> None:
    """QKV from Q4_1 blocks, with a float V fused after them for good measure."""
    q, k, v = _q4_1(_weight(64, IN, 8)), _q4_1(_weight(32, IN, 9)), _weight(32, IN, 10)
    fused = build_linear([q, k, v], WeightFormat.int4)
    x = _x(rows, IN)
    y = fused(x)
    for part, source in zip(y.split((64, 32, 32), dim=-1), (q, k, v), strict=True):
        alone = build_linear([source], WeightFormat.int4)(x)
        torch.testing.assert_close(part, alone, rtol=0, atol=0)
    err, magnitude, exact = _errors(y[:, :64], x, _dequantized(q))
    assert bool((err <= _bf16_bound(magnitude, exact, IN) + x.double().abs() @ _q4_1_weight_error(q).T).all())


def test_other_gguf_block_types_are_dequantised() -> None:
    w = _weight(OUT, IN, 11)
    data = quantize(w.numpy(), GGMLQuantizationType.Q8_0)
    blocks = QuantizedBlocks(qtype="Q8_0", data=data, shape=(OUT, IN))
    dequantised = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q8_0).reshape(OUT, IN))
    x = _x(7, IN)
    for fmt in (WeightFormat.float32, WeightFormat.int4):
        torch.testing.assert_close(
            build_linear([blocks], fmt)(x), build_linear([dequantised], fmt)(x), rtol=0, atol=0
        )


def test_q4_1_blocks_feed_float_formats_dequantised() -> None:
    blocks = _q4_1(_weight(OUT, IN, 12))
    x = _x(7, IN)
    torch.testing.assert_close(
        build_linear([blocks], "float32")(x), x @ _dequantized(blocks).T, rtol=0, atol=0
    )


def test_auto_picks_int4_for_small_batches_and_bfloat16_above() -> None:
    blocks = _q4_1(_weight(OUT, IN, 13))
    layer = build_linear([blocks], "auto")
    assert isinstance(layer, AutoLinear)
    w = _dequantized(blocks)
    # The bfloat16 copy also rounds each weight: by at most U of |W| plus the scale rounding.
    weight_error = _q4_1_weight_error(blocks) * (1 + U) + U * w.double().abs()
    for rows in (1, AUTO_INT4_MAX_ROWS, AUTO_INT4_MAX_ROWS + 1, 33):
        x = _x(rows, IN)
        y = layer(x)
        chosen = layer.small if rows <= AUTO_INT4_MAX_ROWS else layer.large
        torch.testing.assert_close(y, chosen(x), rtol=0, atol=0)
        err, magnitude, exact = _errors(y, x, w)
        assert bool((err <= _bf16_bound(magnitude, exact, IN) + x.double().abs() @ weight_error.T).all())
        assert _rms(err) < 2 * _rounding_rms(x, w)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("int4", Int8Linear), ("int8", Int8Linear), ("bfloat16", BFloat16Linear), ("auto", AutoLinear)],
)
def test_lm_head_stays_at_8_bits_under_the_4_bit_formats(fmt: str, expected: type) -> None:
    head = build_lm_head(_weight(OUT, IN, 17), fmt)
    assert isinstance(head, expected)


def test_auto_lm_head_runs_int8_for_a_few_rows_and_bfloat16_above() -> None:
    weight = _weight(OUT, IN, 19)
    head = build_lm_head(weight, "auto")
    int8, bf16 = build_linear([weight], "int8"), build_linear([weight], "bfloat16")
    for rows in (1, AUTO_HEAD_INT8_MAX_ROWS, AUTO_HEAD_INT8_MAX_ROWS + 1, 32):
        x = _x(rows, IN)
        chosen = int8 if rows <= AUTO_HEAD_INT8_MAX_ROWS else bf16
        torch.testing.assert_close(head(x), chosen(x), rtol=0, atol=0)


def test_activation_dtype_contract() -> None:
    w = _weight(OUT, IN, 14)
    for fmt in WeightFormat:
        layer = build_linear([w], fmt)
        assert layer.activation_dtype == fmt.activation_dtype
        for dtype in (torch.float32, torch.bfloat16):
            assert layer(_x(3, IN).to(dtype)).dtype == fmt.activation_dtype
    assert WeightFormat.float32.activation_dtype == torch.float32
    assert WeightFormat.int4.activation_dtype == torch.bfloat16


def test_leading_dimensions_are_kept() -> None:
    w = _weight(OUT, IN, 15)
    x = torch.randn(2, 3, IN)
    for fmt in WeightFormat:
        layer = build_linear([w], fmt)
        y = layer(x)
        assert y.shape == (2, 3, OUT)
        torch.testing.assert_close(y, layer(x.reshape(6, IN)).reshape(2, 3, OUT), rtol=0, atol=0)


def test_memory_held() -> None:
    out, inp = 100, 256  # 100 outputs: int4 pads to 112
    w = _weight(out, inp, 16)
    sizes = {fmt: build_linear([w], fmt).nbytes for fmt in WeightFormat}
    assert sizes[WeightFormat.float32] == out * inp * 4
    assert sizes[WeightFormat.bfloat16] == out * inp * 2
    assert sizes[WeightFormat.int8] == out * inp + out * 2
    assert sizes[WeightFormat.int4] == 112 * inp // 2 + 112 * (inp // 32) * 2 * 2
    assert sizes[WeightFormat.auto] == sizes[WeightFormat.int4] + sizes[WeightFormat.bfloat16]


def test_int4_pads_outputs_to_the_packer_multiple() -> None:
    w = _weight(41, IN, 17)
    layer = build_linear([w], "int4")
    assert layer.fmt is WeightFormat.int4 and layer.out_features == 41
    x = _x(7, IN)
    y = layer(x)
    assert y.shape == (7, 41)
    err, magnitude, exact = _errors(y, x, Int4Groups.quantize(w).dequantize())
    assert bool((err <= _bf16_bound(magnitude, exact, IN)).all())


def test_int4_packing_by_chunks_equals_packing_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = Int4Groups.quantize(_weight(208, IN, 18))
    whole = Int4Linear(groups)
    monkeypatch.setattr(linear, "_INT4_PACK_ROWS", 64)
    chunked = Int4Linear(groups)
    assert torch.equal(whole.weight, chunked.weight)


@pytest.mark.parametrize(("fmt", "inp"), [("int4", 48), ("auto", 80), ("int8", 40)])
def test_shapes_the_kernels_refuse_fall_back_to_bfloat16(
    fmt: str, inp: int, caplog: pytest.LogCaptureFixture
) -> None:
    w = _weight(OUT, inp, 19)
    with caplog.at_level(logging.WARNING, logger=linear.__name__):
        layer = build_linear([w], fmt)
    assert layer.fmt is WeightFormat.bfloat16
    assert "using bfloat16" in caplog.text
    x = _x(7, inp)
    err, magnitude, exact = _errors(layer(x), x, w.bfloat16().float())
    assert bool((err <= _bf16_bound(magnitude, exact, inp)).all())


def test_bad_inputs_raise_clear_errors() -> None:
    w = _weight(OUT, IN, 20)
    with pytest.raises(ValueError, match="at least one"):
        build_linear([], "int4")
    with pytest.raises(ValueError, match="share in_features"):
        build_linear([w, _weight(OUT, IN + 32, 21)], "int4")
    with pytest.raises(ValueError, match="2-D"):
        build_linear([w[0]], "float32")
    with pytest.raises(ValueError, match="not a valid WeightFormat"):
        build_linear([w], "int3")
    blocks = _q4_1(w)
    with pytest.raises(ValueError, match="does not hold"):
        build_linear([QuantizedBlocks("Q4_1", blocks.data[:, :-20], (OUT, IN))], "int4")
    with pytest.raises(ValueError, match="cannot dequantise"):
        build_linear([QuantizedBlocks("Q9_9", blocks.data, (OUT, IN))], "float32")
    for fmt in WeightFormat:
        for shape in ((2, IN * 2), (2, 3, IN // 2)):
            with pytest.raises((ValueError, RuntimeError)):
                build_linear([w], fmt)(torch.randn(shape))


def test_weight_source_keeps_only_q4_1_blocks() -> None:
    w = _weight(OUT, IN, 22)
    q4_1 = _q4_1(w)
    q8_0 = QuantizedBlocks("Q8_0", quantize(w.numpy(), GGMLQuantizationType.Q8_0), (OUT, IN))

    def source(blocks: QuantizedBlocks | None) -> TensorSource:
        return TensorSource("t", (OUT, IN), "X", "f", lambda: w, None if blocks is None else lambda: blocks)

    assert weight_source(source(q4_1)) is q4_1
    assert weight_source(source(q8_0)) is w
    assert weight_source(source(None)) is w
