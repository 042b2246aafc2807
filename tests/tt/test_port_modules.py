"""Each module of the TT-NN port (ttedge.models.llama.tt) builds from real-shaped random weights and runs
one decode step and one prefill chunk, on mock n150 (Wormhole) and p150 (Blackhole), at SmolLM2-135M shapes
and a tiny config.

Mock validation (no numerics): ttnn checks every op and allocates every buffer; results are zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import ttnn

from tests.tt.support import BATCH, SMOLLM2, SMOLLM2_PRESET, TINY, decode_page_table, random_weights
from ttedge.config import ModelConfig
from ttedge.models.llama.tt.attention import Attention, DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.embedding import Embedding
from ttedge.models.llama.tt.lm_head import LMHead
from ttedge.models.llama.tt.mlp import MLP
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, BLOCK_TOKENS, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.rmsnorm import RMSNorm
from ttedge.models.llama.tt.rope import RotarySetup
from ttedge.models.llama.tt.rope_tables import inverse_frequencies
from ttedge.models.llama.tt.weights import ModelTensors, WeightDtypes, convert_model, host_tensor, pad_to_tile

CONFIGS = {"smollm2": SMOLLM2, "tiny": TINY}


class OneLayer(NamedTuple):
    mesh: ttnn.MeshDevice
    spec: DeviceSpec
    config: ModelConfig
    host: ModelTensors
    dtypes: WeightDtypes


def one_layer(mesh: ttnn.MeshDevice, config: ModelConfig) -> OneLayer:
    """``config`` cut to one decoder layer on ``mesh``, random weights converted for the device."""
    cut = dataclasses.replace(config, num_layers=1)
    host = convert_model(cut, random_weights(cut), SMOLLM2_PRESET)
    return OneLayer(mesh, DeviceSpec.of(mesh), config, host, WeightDtypes.from_preset(SMOLLM2_PRESET, 0))


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_module_runs_one_decode_step(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, name: str
) -> None:
    mesh, spec, config, host, dtypes = one_layer(mock_device(board), CONFIGS[name])
    layer = host.layers[0]
    page_table, blocks = decode_page_table()
    positions = np.arange(BATCH, dtype=np.int32) * 3  # users at different depths, some past block 0
    rope = RotarySetup(mesh, spec, config, inverse_frequencies(config))
    step = DecodeInputs.one_user_per_slot(mesh, rope, positions, page_table)
    hidden_row = ttnn.Shape([1, 1, BATCH, config.hidden_size])
    tokens = np.arange(BATCH, dtype=np.uint32)[None] * 7

    x = Embedding(mesh, host.embed)(host_tensor(tokens, ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT).to(mesh))
    assert x.shape == hidden_row and x.layout == ttnn.TILE_LAYOUT, "embedding"
    normed = RMSNorm(mesh, layer.attn_norm, config.rms_norm_eps)(x)
    assert normed.shape == hidden_row, "rmsnorm"
    attention = Attention(mesh, spec, config, layer, dtypes.kv_cache, blocks)
    assert attention(normed, step).shape == hidden_row, "attention"
    assert attention.k_cache.dtype == dtypes.kv_cache
    mlp = MLP(mesh, spec, layer)
    assert mlp(normed).shape == hidden_row, "mlp"
    assert mlp.w1.weight.dtype == dtypes.w1_w3 and mlp.w2.weight.dtype == dtypes.w2
    dram_sharded = mlp.w1.weight.memory_config()
    assert dram_sharded.buffer_type == ttnn.BufferType.DRAM
    assert dram_sharded.memory_layout == ttnn.TensorMemoryLayout.WIDTH_SHARDED
    assert dram_sharded.shard_spec.num_cores() == spec.dram_banks
    out = DecoderLayer(mesh, spec, config, layer, dtypes.kv_cache, blocks)(x, step)
    assert out.shape == hidden_row, "decoder"
    assert out.memory_config() == ACTIVATIONS_MEMORY
    logits = LMHead(mesh, host.lm_head)(out)
    assert logits.shape == ttnn.Shape([1, 1, BATCH, pad_to_tile(config.vocab_size)]), "lm_head"


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_module_runs_one_prefill_chunk(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, name: str
) -> None:
    """A 40-token prompt padded to 64 rows: attention from the start (causal SDPA over the chunk) and a
    chunk at 64 over the cache (chunked SDPA through the page table), MLP and decoder layer, all in DRAM."""
    mesh, spec, config, host, dtypes = one_layer(mock_device(board), CONFIGS[name])
    layer = host.layers[0]
    page_table, blocks = decode_page_table()
    rope = RotarySetup(mesh, spec, config, inverse_frequencies(config))
    rows = 64
    user_row = page_table[0]

    def chunk(start: int) -> PrefillInputs:
        first = start // BLOCK_TOKENS
        return PrefillInputs(
            start=start,
            fill_page_table=host_tensor(
                user_row[None, first : first + 2], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT
            ).to(mesh),
            page_table=host_tensor(user_row[None], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(mesh),
            rotary=rope.for_prefill(start, rows),
        )

    tokens = (np.arange(rows, dtype=np.uint32) * 7 % config.vocab_size)[None]
    x = Embedding(mesh, host.embed)(
        host_tensor(tokens, ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT).to(mesh), PREFILL_MEMORY
    )
    prompt_rows = ttnn.Shape([1, 1, rows, config.hidden_size])
    assert x.shape == prompt_rows and x.memory_config() == PREFILL_MEMORY, "embedding"
    normed = RMSNorm(mesh, layer.attn_norm, config.rms_norm_eps)(x, PREFILL_MEMORY)
    attention = Attention(mesh, spec, config, layer, dtypes.kv_cache, blocks)
    for start in (0, 64):
        out = attention.prefill(normed, chunk(start))
        assert out.shape == prompt_rows and out.memory_config() == PREFILL_MEMORY, f"attention at {start}"
    assert MLP(mesh, spec, layer).prefill(normed).shape == prompt_rows, "mlp"
    out = DecoderLayer(mesh, spec, config, layer, dtypes.kv_cache, blocks).prefill(x, chunk(0))
    assert out.shape == prompt_rows and out.memory_config() == PREFILL_MEMORY, "decoder"
