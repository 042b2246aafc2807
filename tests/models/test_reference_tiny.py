"""The reference model against transformers' LlamaForCausalLM on small random checkpoints.

Each configuration is written once as a Hugging Face directory and once as a GGUF file, so the
same weights travel both loader paths; GQA ratios, tied/untied heads and rope scaling vary.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_checkpoints import (
    random_state_dict,
    tiny_config,
    write_gguf_checkpoint,
    write_hf_checkpoint,
)
from tests.models.conftest_helpers import full_sequence_logits, pcc
from ttedge.checkpoint import load_checkpoint
from ttedge.config import RopeScaling
from ttedge.models.llama.reference import LlamaModel, RotaryEmbedding, rope_inverse_frequencies
from ttedge.runtime.base import StepInput
from ttedge.runtime.cpu import CpuModelRunner

transformers = pytest.importorskip("transformers")

LLAMA3 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=64)  # fmt: skip
CONFIGS = {
    "mha": {"num_heads": 4, "num_kv_heads": 4},
    "gqa-2": {"num_heads": 4, "num_kv_heads": 2},
    "gqa-3-untied": {"num_heads": 6, "num_kv_heads": 2, "hidden_size": 96, "tie_word_embeddings": False},
    "mqa": {"num_heads": 4, "num_kv_heads": 1},
    "rope-linear": {"rope_scaling": RopeScaling("linear", factor=4.0)},
    "rope-llama3": {"rope_scaling": LLAMA3, "max_position_embeddings": 512},
}


def runner_for(path: Path, weight_format: str = "float32") -> CpuModelRunner:
    return CpuModelRunner(LlamaModel.from_checkpoint(load_checkpoint(path), weight_format), 8 * 2**20)


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory):
    config = tiny_config(**CONFIGS[request.param])
    state = random_state_dict(config, seed=hash(request.param) % 1000)
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = write_hf_checkpoint(root / "hf", config, state)
    gguf_file = write_gguf_checkpoint(root / "model.gguf", config, state)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(3, config.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf_model(torch.tensor([tokens])).logits[0]
    return hf_dir, gguf_file, tokens, expected


def test_prefill_logits_match_transformers_through_both_loaders(tiny):
    hf_dir, gguf_file, tokens, expected = tiny
    for path in (hf_dir, gguf_file):
        got = full_sequence_logits(runner_for(path), tokens)
        assert pcc(got, expected) > 0.99999
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_decode_one_token_at_a_time_matches_prefill(tiny):
    """The KV cache holds exactly what a full prefill would compute, across block boundaries."""
    hf_dir, _, tokens, expected = tiny
    runner = runner_for(hf_dir)
    # Take blocks out of order so the table is not contiguous.
    spare = runner.allocator.allocate(3)
    table: list[int] = []
    runner.allocator.grow_table(table, 10)
    runner.allocator.free(spare)
    (first,) = runner.run([StepInput(tokens[:10], 0, table)])
    rows = [first[0]]
    for position in range(10, len(tokens)):
        runner.allocator.grow_table(table, position + 1)
        (logits,) = runner.run([StepInput([tokens[position]], position, table)])
        rows.append(logits[0])
    torch.testing.assert_close(torch.stack(rows), expected[9:], atol=2e-4, rtol=1e-4)


def test_mixed_batch_matches_each_sequence_alone(tiny):
    """Prefill chunks and decodes of different sequences in one forward don't disturb each other."""
    hf_dir, _, tokens, expected = tiny
    runner = runner_for(hf_dir)
    a, b, c = [], [], []
    for table, length in ((a, 70), (b, 40), (c, 100)):
        runner.allocator.grow_table(table, length)
    runner.run([StepInput(tokens[:69], 0, a), StepInput(tokens[:39], 0, c)])
    logits = runner.run(
        [
            StepInput(tokens[69:70], 69, a),  # decode
            StepInput(tokens[:40], 0, b, all_logits=True),  # whole prefill
            StepInput(tokens[39:100], 39, c, all_logits=True),  # second prefill chunk
        ]
    )
    torch.testing.assert_close(logits[0][0], expected[69], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], expected[:40], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2], expected[39:100], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("weight_format", ["bfloat16", "int8", "int4"])
def test_low_precision_formats_stay_close_to_float32(tiny, weight_format):
    hf_dir, _, tokens, expected = tiny
    got = full_sequence_logits(runner_for(hf_dir, weight_format), tokens)
    assert pcc(got, expected) > 0.99


def test_rotary_equals_rotate_half_bit_for_bit():
    """The roll-and-signed-sin form computes Hugging Face's rotate-half products and sums exactly."""
    from transformers.models.llama.modeling_llama import rotate_half

    config = tiny_config()
    inv_freq = rope_inverse_frequencies(config)
    rope = RotaryEmbedding(inv_freq, config.max_position_embeddings, torch.float32)
    positions = torch.randint(
        0, config.max_position_embeddings, (40,), generator=torch.Generator().manual_seed(3)
    )
    x = torch.randn(40, config.num_heads, config.head_dim, generator=torch.Generator().manual_seed(4))
    angles = torch.outer(positions.float(), inv_freq)
    cos = torch.cat((angles, angles), -1).cos()[:, None]
    sin = torch.cat((angles, angles), -1).sin()[:, None]
    expected = x * cos + rotate_half(x) * sin
    got = rope(x, rope.cos[positions][:, None], rope.signed_sin[positions][:, None])
    assert torch.equal(got, expected)
