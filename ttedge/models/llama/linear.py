"""Weight formats for the CPU backend's linear layers: ``y = x @ W.T`` with W held as float32,
bfloat16, int8 or int4, chosen once when the model is built.

Activation dtype contract
-------------------------
Every ``Linear`` consumes and produces activations in ``fmt.activation_dtype``: float32 for the
``float32`` format, bfloat16 for all others (the int8 and int4 kernels only take bfloat16
activations, and bfloat16 ``x @ W`` is what runs on AMX). Input of another floating dtype is
converted on entry, but the output is always in the activation dtype and never converted back, so
a model that keeps its stream in ``fmt.activation_dtype`` pays for no conversions at all. Each
conversion costs an op dispatch (1-2 µs at decode sizes, several per layer), which is a sizeable
share of a 135M model's step; ``scripts/bench_linear.py`` measures it against the matmuls.
A float32 residual stream can still be kept: in-place adds such as ``x += linear(h)`` accept a
bfloat16 operand without a separate conversion op.

Low-precision formats hand back bfloat16 logits from the LM head (8 significant bits): a logit of
20 is only good to ±0.04, so probabilities and logprobs derived from it carry a few percent of
relative error; argmax and sampling are unaffected in practice.

Which weights to quantise is the model's choice, per projection. GGUF files keep the (tied)
embedding/LM head above 4 bits for a reason: on SmolLM2-135M's Q4_1 file (Q8_0 embedding),
requantising the LM head to int4 lowers teacher-forced top-1 agreement with float32 from 0.98 to
0.90, while an int8 LM head keeps 0.98.

Exactness of GGUF Q4_1
----------------------
torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) dequantises group-wise as
``w = (q - 8) * scale + zero`` with unsigned codes ``q`` in [0, 15] and ``scale``/``zero`` in the
activation dtype. GGUF Q4_1 stores ``w = d * q + m`` per 32 weights, so its codes repack verbatim
with ``scale = d`` and ``zero = m + 8 d``. The only rounding left is that of ``d`` and ``m + 8 d``
to bfloat16: weight error ≤ 0.04 d (RMS 0.006 d, against 0.28 d for Q4_1's own quantisation),
about as large as the rounding of activations to bfloat16. float32 or float16 scales are accepted
only with activations of the same dtype, and the kernel then runs a scalar loop 30-120x slower, so
bfloat16 it is.

Batch invariance
----------------
The int8 and int4 kernels compute every row on its own: a token's output is bit for bit the same
whatever else is in the batch, so a multi-token verify forward reproduces single-token decode
exactly. float32 (MKL) and bfloat16 (oneDNN) pick different kernels by batch size and differ in the
last bits, and ``auto`` switches weights with it; exactness claims across batch sizes need the
comparison made at the same batch shape there.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

from ttedge.checkpoint.base import QuantizedBlocks, TensorSource

log = logging.getLogger(__name__)

# A float tensor [out, in] or the raw GGUF blocks of one; Q4_1 blocks repack exactly into int4.
WeightSource: TypeAlias = torch.Tensor | QuantizedBlocks

GROUP_SIZE = 32
# torch 2.13's int8 kernel returns wrong results, or crashes, when K is not a multiple of 16.
_INT8_K_MULTIPLE = 16
# The int4 packer rejects N that is not a multiple of 16; padded rows cost nothing but a slice.
_INT4_N_MULTIPLE = 16
# Rows packed per call: bounds the int32 code buffer the packer wants (a multiple of its 64-row tile).
_INT4_PACK_ROWS = 4096
# Rows (tokens) up to which `auto` runs int4: above, bfloat16 on AMX is faster (scripts/bench_linear.py).
AUTO_INT4_MAX_ROWS = 8
# Rows up to which the `auto` LM head runs int8; measured on the 49152 x 576 head of SmolLM2.
AUTO_HEAD_INT8_MAX_ROWS = 2

_Q4_1_BLOCK_BYTES = 20  # float16 d, float16 m, 16 bytes of nibbles


class WeightFormat(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    # Weight-only, symmetric per output channel, bfloat16 activations.
    int8 = "int8"
    # Weight-only, asymmetric groups of 32 along the input, bfloat16 activations.
    int4 = "int4"
    # int4 and bfloat16 copies of each weight; int4 for up to AUTO_INT4_MAX_ROWS rows, bfloat16 above.
    auto = "auto"

    @property
    def row_independent(self) -> bool:
        """Each output row is computed from its input row alone, whatever the other rows
        (tests/models/test_linear.py); ``auto`` switches kernels with the row count."""
        return self in (WeightFormat.int8, WeightFormat.int4)

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self is WeightFormat.float32 else torch.bfloat16


def weight_source(tensor: TensorSource) -> WeightSource:
    """What ``build_linear`` should get for a checkpoint tensor: Q4_1 blocks as they are (they repack
    into int4 without rounding), anything else loaded as float."""
    blocks = tensor.quantized_blocks()
    if blocks is not None and blocks.qtype == GGMLQuantizationType.Q4_1.name:
        return blocks
    return tensor.load()


class Linear(ABC):
    """``y = x @ W.T`` over the last dimension of ``x``, in one weight format.

    Not an ``nn.Module``: its call overhead (about 0.6 µs against 0.1 µs) adds up over a decode step.
    """

    fmt: WeightFormat
    in_features: int
    out_features: int

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.fmt.activation_dtype

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of weight data held."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] of any float dtype -> [..., out] in ``activation_dtype``."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in={self.in_features}, out={self.out_features}, fmt={self.fmt.value})"

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the contiguous 2-D bfloat16 matrix the quantised kernels take. They check the
        width of a 2-D input themselves; other shapes are checked here, as a reshape would hide it."""
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if x.dim() != 2:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"{self!r} got input of shape {tuple(x.shape)}")
            x = x.reshape(-1, self.in_features)
        return x.contiguous()


class Float32Linear(Linear):
    fmt = WeightFormat.float32

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.to(torch.float32).contiguous()
        self.out_features, self.in_features = self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return F.linear(x, self.weight)


class BFloat16Linear(Linear):
    """bfloat16 weights, pre-packed for oneDNN where it is available: at decode sizes that is 2-4x
    faster than ``F.linear`` on a plain bfloat16 weight, and it runs AMX for larger batches."""

    fmt = WeightFormat.bfloat16

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        plain = weight.to(torch.bfloat16).contiguous()
        self._packed = torch.backends.mkldnn.is_available()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(plain, None) if self._packed else plain

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        if self._packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)


class Int8Linear(Linear):
    """int8 weights with one bfloat16 scale per output channel (``torch._weight_int8pack_mm``)."""

    fmt = WeightFormat.int8

    def __init__(self, weight: torch.Tensor):
        self.out_features, self.in_features = weight.shape
        weight = weight.to(torch.float32)
        # Round the scale first and quantise against it, so q * scale is exactly what the kernel uses.
        scale = (weight.abs().amax(dim=1) / 127).to(torch.bfloat16)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.scale = scale
        self.weight = (weight / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(self._matrix(x), self.weight, self.scale)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


@dataclass
class Int4Groups:
    """4-bit codes and per-group bfloat16 ``scale``/``zero`` in the int4 kernel's convention:
    ``w[n, k] = (codes[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # bfloat16 [N, K / 32]
    zero: torch.Tensor  # bfloat16 [N, K / 32]

    @classmethod
    def from_q4_1(cls, blocks: QuantizedBlocks) -> Int4Groups:
        """Q4_1's codes as they are, ``scale = d``, ``zero = m + 8 d``: no requantisation."""
        rows, cols = blocks.shape
        groups = cols // GROUP_SIZE
        if cols % GROUP_SIZE or blocks.data.shape != (rows, groups * _Q4_1_BLOCK_BYTES):
            raise ValueError(f"Q4_1 data of shape {blocks.data.shape} does not hold a {rows}x{cols} tensor")
        raw = torch.from_numpy(np.ascontiguousarray(blocks.data, dtype=np.uint8)).view(rows, groups, -1)
        d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        nibbles = raw[..., 4:]
        # Byte j of a block holds weight j in its low nibble and weight j + 16 in its high nibble.
        codes = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).reshape(rows, cols)
        # m + 8 d is exact in float32 unless d is tiny next to m; the cast to bfloat16 is what rounds.
        return cls(codes, d.to(torch.bfloat16), (m + 8 * d).to(torch.bfloat16))

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int4Groups:
        """Asymmetric min/max quantisation of each group of 32, on the grid the kernel will really use
        (scale and zero already rounded to bfloat16)."""
        rows, cols = weight.shape
        groups = weight.to(torch.float32).reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((hi - lo) / 15).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        origin = zero.float() - 8 * scale.float()
        step = torch.where(scale > 0, scale.float(), torch.ones_like(lo))
        codes = ((groups - origin[..., None]) / step[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return cls(codes.reshape(rows, cols), scale, zero)

    @classmethod
    def cat(cls, parts: Sequence[Int4Groups]) -> Int4Groups:
        """Groups of several weights stacked along the output dimension; exact, as rows are independent."""
        if len(parts) == 1:
            return parts[0]
        return cls(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weights the int4 kernel computes with."""
        rows, cols = self.codes.shape
        codes = self.codes.reshape(rows, -1, GROUP_SIZE).float() - 8
        weight = codes * self.scale.float()[..., None] + self.zero.float()[..., None]
        return weight.reshape(rows, cols)


class Int4Linear(Linear):
    """4-bit weights in groups of 32 with bfloat16 scale and zero (``torch._weight_int4pack_mm_for_cpu``)."""

    fmt = WeightFormat.int4

    def __init__(self, groups: Int4Groups):
        self.out_features, self.in_features = groups.codes.shape
        pad = -self.out_features % _INT4_N_MULTIPLE
        codes, scale, zero = groups.codes, groups.scale, groups.zero
        if pad:
            # Zero scale and zero make the padded outputs 0; forward slices them off.
            codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, zero))
        self._padded = bool(pad)
        # The packer's 64-row tiles are laid out one after the other, so packing by chunks is the same.
        self.weight = torch.cat(
            [
                torch._convert_weight_to_int4pack_for_cpu(chunk.to(torch.int32), 1)
                for chunk in codes.split(_INT4_PACK_ROWS)
            ]
        )
        # [K / 32, N, 2]: the kernel reads scale and zero of 16 outputs of one group together.
        self.scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales_and_zeros.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(self._matrix(x), self.weight, GROUP_SIZE, self.scales_and_zeros)
        if self._padded:
            y = y[:, : self.out_features]
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


class AutoLinear(Linear):
    """A small-batch kernel up to ``max_small_rows`` rows, bfloat16 on AMX above.

    Small batches are bandwidth-bound, so fewer bytes per weight win; large ones are compute-bound,
    where AMX's bfloat16 wins (``scripts/bench_linear.py``). Memory is both copies.
    """

    fmt = WeightFormat.auto

    def __init__(self, small: Linear, large: Linear, max_small_rows: int):
        self.small, self.large = small, large
        self.out_features, self.in_features = small.out_features, small.in_features
        self._max_small_elements = max_small_rows * self.in_features

    @classmethod
    def from_int4(cls, groups: Int4Groups) -> AutoLinear:
        """int4 and bfloat16 (4.2x int4, 1.3x bfloat16 in memory). The bfloat16 copy is made from the
        int4 weights, not from the source, so switching with the batch size moves results by bfloat16
        rounding, not by a quantisation step."""
        return cls(Int4Linear(groups), BFloat16Linear(groups.dequantize()), AUTO_INT4_MAX_ROWS)

    @property
    def nbytes(self) -> int:
        return self.small.nbytes + self.large.nbytes

    def part_for(self, elements: int) -> Linear:
        """The copy that runs on an input of ``elements`` elements."""
        return self.small if elements <= self._max_small_elements else self.large

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part_for(x.numel()).forward(x)


def build_lm_head(weight: WeightSource, fmt: WeightFormat | str) -> Linear:
    """The LM head: as the body, except that it stays at 8 bits under the 4-bit formats, as GGUF files
    keep it (requantising SmolLM2's Q8_0 head to int4 drops top-1 agreement with float32 from 0.98
    to 0.90). Under ``auto`` it is int8 for up to AUTO_HEAD_INT8_MAX_ROWS rows and bfloat16 above,
    where the int8 kernel is 6x slower than AMX at 32 rows."""
    fmt = WeightFormat(fmt)
    if fmt is WeightFormat.int4:
        return build_linear([weight], WeightFormat.int8)
    if fmt is WeightFormat.auto:
        int8 = build_linear([weight], WeightFormat.int8)
        if int8.fmt is not WeightFormat.int8:
            return int8
        return AutoLinear(int8, BFloat16Linear(_as_float(weight)), AUTO_HEAD_INT8_MAX_ROWS)
    return build_linear([weight], fmt)


def build_linear(weights: Sequence[WeightSource], fmt: WeightFormat | str) -> Linear:
    """One ``Linear`` for ``weights`` concatenated along the output dimension (fused QKV, gate+up).

    Each weight is a float tensor ``[out_i, in]`` or GGUF blocks of one; Q4_1 blocks keep their codes
    bit for bit in the int4 and auto formats, also when concatenated with other sources. Shapes the
    quantised kernels cannot run (``in`` not a multiple of 32 for int4, of 16 for int8) fall back
    to bfloat16, which keeps the activation dtype; the returned object's ``fmt`` says what was built.
    """
    fmt = WeightFormat(fmt)
    if not weights:
        raise ValueError("build_linear needs at least one weight")
    shapes = [_shape(w) for w in weights]
    in_features = shapes[0][1]
    if any(cols != in_features for _, cols in shapes):
        raise ValueError(f"weights to fuse must share in_features, got shapes {shapes}")

    if fmt in (WeightFormat.int4, WeightFormat.auto) and in_features % GROUP_SIZE:
        log.warning(
            "%s weights %s: in_features is not a multiple of %d, using bfloat16",
            fmt.value,
            shapes,
            GROUP_SIZE,
        )
        fmt = WeightFormat.bfloat16
    if fmt is WeightFormat.int8 and in_features % _INT8_K_MULTIPLE:
        log.warning(
            "int8 weights %s: in_features is not a multiple of %d, using bfloat16", shapes, _INT8_K_MULTIPLE
        )
        fmt = WeightFormat.bfloat16

    if fmt in (WeightFormat.int4, WeightFormat.auto):
        groups = Int4Groups.cat([_int4_groups(w) for w in weights])
        return Int4Linear(groups) if fmt is WeightFormat.int4 else AutoLinear.from_int4(groups)
    weight = torch.cat([_as_float(w) for w in weights]) if len(weights) > 1 else _as_float(weights[0])
    if fmt is WeightFormat.float32:
        return Float32Linear(weight)
    if fmt is WeightFormat.bfloat16:
        return BFloat16Linear(weight)
    return Int8Linear(weight)


def _shape(weight: WeightSource) -> tuple[int, int]:
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise ValueError(f"a linear weight must be 2-D [out, in], got shape {shape}")
    return shape[0], shape[1]


def _as_float(weight: WeightSource) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        if not weight.is_floating_point():
            raise ValueError(f"a linear weight must be floating point, got {weight.dtype}")
        return weight
    try:
        values = dequantize(weight.data, GGMLQuantizationType[weight.qtype])
    except (KeyError, NotImplementedError, ValueError) as err:
        raise ValueError(f"cannot dequantise GGUF {weight.qtype} blocks: {err}") from err
    return torch.from_numpy(values.reshape(weight.shape).astype(np.float32, copy=False))


def _int4_groups(weight: WeightSource) -> Int4Groups:
    if isinstance(weight, QuantizedBlocks) and weight.qtype == GGMLQuantizationType.Q4_1.name:
        return Int4Groups.from_q4_1(weight)
    return Int4Groups.quantize(_as_float(weight))
