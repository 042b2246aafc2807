"""The whole model of the TT-NN port (ttedge.models.llama.tt.model.Transformer) over all layers, on mock
n150 (Wormhole) and p150 (Blackhole): a prompt prefilled (from the start, and a chunk deeper into the cache),
then decode steps; several steps at a tiny config, one at SmolLM2-135M's 30 layers.

Mock validation (no numerics): ttnn checks every op and allocates every buffer; logits are zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import ttnn

from tests.tt.support import BATCH, SMOLLM2, SMOLLM2_PRESET, TINY, decode_page_table, random_weights
from ttedge.config import ModelConfig
from ttedge.model_zoo import PrecisionPreset, find_card
from ttedge.models.llama.tt.model import Transformer
from ttedge.models.llama.tt.weights import WeightDtypes, pad_to_tile


def card_preset(card: str, preset: str) -> PrecisionPreset:
    found = find_card(card)
    assert found is not None and found.tt is not None
    return found.tt.preset(preset)


def run_model(mesh: ttnn.MeshDevice, config: ModelConfig, preset: PrecisionPreset, steps: int) -> None:
    page_table, blocks = decode_page_table()
    model = Transformer(mesh, config, random_weights(config), preset, blocks)
    padded_vocab = pad_to_tile(config.vocab_size)
    # User 0's prompt: 40 tokens from the start (the last token's tile row comes back), then 30 more from
    # position 64 attending to the cache, with every row's logits.
    prompt = np.arange(70, dtype=np.uint32) % config.vocab_size
    first = model.prefill(prompt[:40], page_table[0])
    assert first.shape == ttnn.Shape([1, 1, 32, padded_vocab])
    rest = model.prefill(prompt[40:], page_table[0], start=64, all_rows=True)
    assert rest.shape == ttnn.Shape([1, 1, 32, padded_vocab])
    assert len(model.layers) == config.num_layers
    dtypes = WeightDtypes.from_preset(preset, 0)
    first = model.layers[0]
    assert first.attention.wqkv.weight.dtype == dtypes.attention
    assert first.mlp.w1.weight.dtype == dtypes.w1_w3 and first.mlp.w2.weight.dtype == dtypes.w2
    assert first.attention.k_cache.dtype == dtypes.kv_cache
    rng = np.random.default_rng(2)
    # Users at different depths; each step every user moves one token on (crossing a block boundary).
    positions = np.arange(BATCH, dtype=np.int32) + 30
    for _ in range(steps):
        tokens = rng.integers(0, config.vocab_size, BATCH).astype(np.uint32)
        logits = model.decode(tokens, positions, page_table)
        assert logits.shape == ttnn.Shape([1, 1, BATCH, padded_vocab])
        positions = positions + 1


# The three dtype mixes the cards name: block-float 8 throughout, bfloat16 throughout, and bfloat4_b
# gate/up projections with bfloat8_b elsewhere (tt_transformers' performance mode).
PRESETS = [
    ("smollm2-135m-instruct", "performance"),
    ("smollm2-135m-instruct", "accuracy"),
    ("llama-3.2-1b-instruct", "performance"),
]


@pytest.mark.parametrize("board", ["n150", "p150"])
@pytest.mark.parametrize("card,preset", PRESETS)
def test_tiny_model_prefills_and_decodes_three_steps(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str, card: str, preset: str
) -> None:
    run_model(mock_device(board), TINY, card_preset(card, preset), steps=3)


@pytest.mark.parametrize("board", ["n150", "p150"])
def test_smollm2_prefills_and_decodes_one_step_over_all_30_layers(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], board: str
) -> None:
    run_model(mock_device(board), SMOLLM2, SMOLLM2_PRESET, steps=1)
