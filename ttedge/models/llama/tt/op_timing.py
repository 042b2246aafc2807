"""Per-op timing of one decode layer of the port on a device (``scripts/bench_kernels.py``'s TT part).

Each op is the port's own module call for one decode step of 32 users, timed from its call to the end of a
``ttnn.synchronize_device``: device time plus dispatch from the host (the port's decode is not traced yet;
per-kernel device cycles need a profiler build of tt-metal, which the pip ttnn is not). Weights are random,
in the card preset's dtypes; each op's cost is its weights, KV cache and activations read once and its
outputs written once, for the roofline of the card (``ttedge.perf.hardware``).

On a mock cluster every op runs through ttnn's checks and allocation but nothing executes: the times mean
nothing there, and the TT tier runs this only to prove that the ops build and run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import ttnn

from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset
from ttedge.models.llama.tt.attention import DecodeInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.linear import DramShardedLinear
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, BATCH, BLOCK_TOKENS, DeviceSpec
from ttedge.models.llama.tt.rope import RotarySetup
from ttedge.models.llama.tt.rope_tables import inverse_frequencies
from ttedge.models.llama.tt.ttlang import choose_kernels
from ttedge.models.llama.tt.weights import WeightDtypes, convert_layer, host_tensor
from ttedge.perf.hardware import BLACKHOLE_P150, WORMHOLE_N150, HardwareSpec
from ttedge.perf.roofline import CostedOp, OpCost, time_round_robin
from ttedge.runtime.tt_host import TILE_BYTES

ACTIVATION_BYTES = 2  # bfloat16


@dataclass(frozen=True)
class DeviceTiming:
    op: str
    seconds: float
    median_seconds: float
    cost: OpCost


def card_of(mesh: ttnn.MeshDevice) -> HardwareSpec:
    """The spec of the single chip ``mesh`` opened."""
    return BLACKHOLE_P150 if "BLACKHOLE" in str(DeviceSpec.of(mesh).arch) else WORMHOLE_N150


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The canonical shapes of layer 0's weights (``[out, in]``, ttedge.checkpoint.base names)."""
    h, ff, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    shapes = {
        "attn_norm.weight": (h,),
        "attn.q.weight": (q, h),
        "attn.k.weight": (kv, h),
        "attn.v.weight": (kv, h),
        "attn.o.weight": (h, q),
        "mlp_norm.weight": (h,),
        "mlp.gate.weight": (ff, h),
        "mlp.up.weight": (ff, h),
        "mlp.down.weight": (h, ff),
    }
    return {f"layers.0.{name}": shape for name, shape in shapes.items()}


def random_layer(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Canonical float32 weights of layer 0 of ``config`` (``[out, in]``, ttedge.checkpoint.base names)."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape, dtype=np.float32) * 0.02
        for name, shape in layer_shapes(config).items()
    }


def _dtype_name(dtype: ttnn.DataType) -> str:
    return str(dtype).rsplit(".", 1)[-1].lower()


def _weight_bytes(weight: ttnn.Tensor) -> int:
    return weight.logical_volume() // (32 * 32) * TILE_BYTES[_dtype_name(weight.dtype)]


def decode_layer_ops(
    mesh: ttnn.MeshDevice, config: ModelConfig, preset: PrecisionPreset, context: int, ttlang_kernels: bool
) -> list[CostedOp]:
    """One decode layer's ops at ``context`` cached tokens per user, in the port's order."""
    spec = DeviceSpec.of(mesh)
    blocks_per_user = -(-(context + 1) // BLOCK_TOKENS)
    num_blocks = BATCH * blocks_per_user
    dtypes = WeightDtypes.from_preset(preset, 0)
    layer = DecoderLayer(
        mesh,
        spec,
        config,
        convert_layer(dataclasses.replace(config, num_layers=1), random_layer(config), dtypes, 0),
        dtypes.kv_cache,
        num_blocks,
        choose_kernels(ttlang_kernels, config),
    )
    positions = np.full(BATCH, context, np.int32)
    page_table = np.arange(num_blocks, dtype=np.int32).reshape(BATCH, blocks_per_user)
    rope = RotarySetup(mesh, spec, config, inverse_frequencies(config))
    step = DecodeInputs.one_user_per_slot(mesh, rope, positions, page_table)
    hidden, mlp = config.hidden_size, config.intermediate_size
    x = host_tensor(np.zeros((1, 1, BATCH, hidden), np.float32), ttnn.bfloat16).to(mesh, ACTIVATIONS_MEMORY)
    # Each op's inputs, made once by the ops before it.
    normed = layer.attn_norm(x)
    attended = layer.attention(normed, step)
    h, mlp_in = layer.mlp_norm(x, attended)
    gate, up = layer.mlp.w1(mlp_in), layer.mlp.w3(mlp_in)
    gated = layer.mlp.silu_multiply(gate, up)
    down = ttnn.sharded_to_interleaved(layer.mlp.w2(gated), ACTIVATIONS_MEMORY)

    row = BATCH * hidden * ACTIVATION_BYTES
    attention = layer.attention
    kv_format = _dtype_name(attention.k_cache.dtype)
    kv_bytes = (
        2 * BATCH * config.num_kv_heads * (context + 1) * config.head_dim * TILE_BYTES[kv_format] // 1024
    )
    qkv_width = config.q_size + 2 * config.kv_size
    attention_cost = OpCost(
        _weight_bytes(attention.wqkv.weight) + _weight_bytes(attention.wo.weight) + kv_bytes + 2 * row,
        2 * BATCH * hidden * (qkv_width + config.q_size)
        + 4 * BATCH * config.num_heads * (context + 1) * config.head_dim,
        _dtype_name(attention.wqkv.weight.dtype),
    )

    def projection(
        name: str, linear: DramShardedLinear, x_in: ttnn.Tensor, width_in: int, width_out: int
    ) -> CostedOp:
        weight = linear.weight
        cost = OpCost(
            _weight_bytes(weight) + BATCH * (width_in + width_out) * ACTIVATION_BYTES,
            2 * BATCH * width_in * width_out,
            _dtype_name(weight.dtype),
        )
        return CostedOp(name, lambda: linear(x_in), cost)

    return [
        CostedOp("attn_norm", lambda: layer.attn_norm(x), OpCost(2 * row, 4 * BATCH * hidden, "bfloat16")),
        CostedOp("attention", lambda: layer.attention(normed, step), attention_cost),
        CostedOp(
            "residual_norm",
            lambda: layer.mlp_norm(x, attended),
            OpCost(4 * row, 5 * BATCH * hidden, "bfloat16"),
        ),
        projection("w1", layer.mlp.w1, mlp_in, hidden, mlp),
        projection("w3", layer.mlp.w3, mlp_in, hidden, mlp),
        CostedOp(
            "silu_multiply",
            lambda: layer.mlp.silu_multiply(gate, up),
            OpCost(3 * BATCH * mlp * ACTIVATION_BYTES, 5 * BATCH * mlp, "bfloat16"),
        ),
        projection("w2", layer.mlp.w2, gated, mlp, hidden),
        CostedOp(
            "residual_add",
            lambda: ttnn.add(h, down, memory_config=ACTIVATIONS_MEMORY),
            OpCost(3 * row, BATCH * hidden, "bfloat16"),
        ),
    ]


def time_ops(mesh: ttnn.MeshDevice, ops: list[CostedOp], iterations: int) -> list[DeviceTiming]:
    """(fastest, median) seconds per op over ``iterations`` rounds of the ops in turn, each timed until
    the device is idle, after a first round that builds their programs."""
    times = time_round_robin(ops, iterations, wait=lambda: ttnn.synchronize_device(mesh))
    return [DeviceTiming(op.name, *times[op.name], op.cost) for op in ops]
