"""GGUF checkpoints: exact and quantised round trips, Q/K row order, metadata, validation errors."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from tests.fixtures.tiny_checkpoints import (
    gguf_tensor_name,
    llama3_freq_factors,
    llama_cpp_permute,
    quantize,
    random_state_dict,
    tiny_config,
    write_gguf_checkpoint,
)
from ttedge.checkpoint import SUPPORTED_GGUF_TYPES, CheckpointError, canonical_shapes, load_checkpoint
from ttedge.config import ModelConfig, RopeScaling

# Normalised RMS error (error RMS / weight std) each format reaches on Gaussian weights with the
# fixture's encoders, with some headroom: 4-bit ~0.08, 6-bit ~0.02, 8-bit ~0.005.
_MAX_RELATIVE_ERROR = {"Q8_0": 0.008, "Q6_K": 0.03, "Q4_0": 0.1, "Q4_1": 0.09, "Q4_K": 0.09}


def _raw_tensors(file: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(file).tensors}


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_round_trip_is_exact(tmp_path: Path, qtype: str) -> None:
    config = tiny_config()
    state = random_state_dict(config, seed=3)
    file = write_gguf_checkpoint(tmp_path / "tiny.gguf", config, state, qtype=qtype)
    checkpoint = load_checkpoint(file)
    assert checkpoint.format == "gguf"
    assert checkpoint.tokenizer_path == file
    assert set(checkpoint.tensors) == set(state)
    rounding = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
    for name, expected in state.items():
        source = checkpoint[name]
        matrix = expected.dim() == 2
        assert source.stored_dtype == (qtype if matrix else "F32")
        assert source.quantized_blocks() is None
        loaded = source.load()
        assert loaded.dtype == torch.float32
        want = expected.to(rounding).float() if matrix else expected
        assert torch.equal(loaded, want), name


@pytest.mark.parametrize(("qtype", "dtype"), [("F16", torch.float16), ("BF16", torch.bfloat16)])
def test_keep_dtype(tmp_path: Path, qtype: str, dtype: torch.dtype) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    file = write_gguf_checkpoint(tmp_path / "tiny.gguf", config, state, qtype=qtype)
    checkpoint = load_checkpoint(file, keep_dtype=True)
    for name in ("layers.0.attn.q.weight", "layers.1.mlp.down.weight"):
        loaded = checkpoint.load(name)
        assert loaded.dtype == dtype
        assert torch.equal(loaded, state[name].to(dtype)), name
    assert checkpoint.load("norm.weight").dtype == torch.float32


@pytest.fixture(scope="module")
def k_quant_config() -> ModelConfig:
    # K-quants pack 256 values per block, so every matrix needs rows of a multiple of 256 columns.
    return tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantised_round_trip(tmp_path: Path, qtype: str, k_quant_config: ModelConfig) -> None:
    config = k_quant_config
    state = random_state_dict(config, seed=4)
    file = write_gguf_checkpoint(tmp_path / "tiny.gguf", config, state, qtype=qtype)
    checkpoint = load_checkpoint(file)
    raw = _raw_tensors(file)
    ggml_type = GGMLQuantizationType[qtype]
    for name, original in state.items():
        source = checkpoint[name]
        loaded = source.load()
        assert loaded.dtype == torch.float32
        assert loaded.shape == original.shape
        if original.dim() == 1:
            assert torch.equal(loaded, original)
            continue
        assert source.stored_dtype == qtype
        # Exactly what gguf's own decoder makes of the bytes in the file (rows in file order).
        stored = raw[gguf_tensor_name(name)]
        decoded = gguf.quants.dequantize(stored.data, ggml_type)
        assert np.array_equal(_to_file_order(name, loaded.numpy(), config), decoded), name
        # And as close to the original as the format allows, but not equal: it was quantised.
        relative = ((loaded - original).pow(2).mean().sqrt() / original.std()).item()
        assert 0 < relative < _MAX_RELATIVE_ERROR[qtype], (name, relative)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantized_blocks_decode_to_load(tmp_path: Path, qtype: str, k_quant_config: ModelConfig) -> None:
    config = k_quant_config
    state = random_state_dict(config, seed=5)
    checkpoint = load_checkpoint(write_gguf_checkpoint(tmp_path / "t.gguf", config, state, qtype=qtype))
    for name, source in checkpoint.tensors.items():
        blocks = source.quantized_blocks()
        if len(source.shape) == 1:
            assert blocks is None
            continue
        assert blocks is not None
        assert blocks.qtype == qtype
        assert blocks.shape == source.shape
        assert blocks.data.dtype == np.uint8
        assert blocks.data.shape[0] == source.shape[0]
        decoded = gguf.quants.dequantize(blocks.data, GGMLQuantizationType[qtype])
        assert np.array_equal(decoded, source.load().numpy()), name


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_qk_rows_return_to_hugging_face_order(tmp_path: Path, heads: int, kv_heads: int) -> None:
    config = tiny_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
    state = random_state_dict(config, seed=heads * 10 + kv_heads)
    file = write_gguf_checkpoint(tmp_path / "tiny.gguf", config, state)
    checkpoint = load_checkpoint(file)
    raw = _raw_tensors(file)
    for layer in range(config.num_layers):
        for proj, stored_name in (("q", "attn_q"), ("k", "attn_k")):
            name = f"layers.{layer}.attn.{proj}.weight"
            stored = torch.from_numpy(np.array(raw[f"blk.{layer}.{stored_name}.weight"].data))
            assert not torch.equal(stored, state[name]), "the file should hold permuted rows"
            assert torch.equal(checkpoint.load(name), state[name]), name


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (12, 4)])
def test_quantized_blocks_come_back_in_canonical_row_order(tmp_path: Path, heads: int, kv_heads: int) -> None:
    config = tiny_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=16)
    state = random_state_dict(config, seed=6)
    checkpoint = load_checkpoint(write_gguf_checkpoint(tmp_path / "t.gguf", config, state, qtype="Q4_1"))
    for name in ("layers.0.attn.q.weight", "layers.1.attn.k.weight", "layers.0.attn.v.weight"):
        blocks = checkpoint[name].quantized_blocks()
        assert blocks is not None
        # Q4_1 encodes each row on its own, so encoding the canonical rows gives the same bytes.
        assert np.array_equal(blocks.data, quantize(state[name].numpy(), "Q4_1")), name


def test_tied_and_untied(tmp_path: Path) -> None:
    tied = tiny_config(tie_word_embeddings=True)
    checkpoint = load_checkpoint(write_gguf_checkpoint(tmp_path / "tied.gguf", tied, random_state_dict(tied)))
    assert checkpoint.config.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.tensors
    assert "output.weight" not in _raw_tensors(tmp_path / "tied.gguf")

    untied = tiny_config(tie_word_embeddings=False)
    state = random_state_dict(untied)
    checkpoint = load_checkpoint(write_gguf_checkpoint(tmp_path / "untied.gguf", untied, state))
    assert not checkpoint.config.tie_word_embeddings
    assert torch.equal(checkpoint.load("lm_head.weight"), state["lm_head.weight"])


def test_config_and_metadata(tmp_path: Path) -> None:
    config = tiny_config(name="meta-test", rope_theta=500000.0, rms_norm_eps=1e-6, eos_token_ids=(7,))
    file = write_gguf_checkpoint(
        tmp_path / "tiny.gguf",
        config,
        random_state_dict(config),
        metadata={"tokenizer.ggml.eot_token_id": 9, "tokenizer.chat_template": "{{ x }}"},
    )
    checkpoint = load_checkpoint(file)
    loaded = checkpoint.config
    assert loaded.name == "meta-test"
    assert (loaded.num_layers, loaded.hidden_size, loaded.intermediate_size) == (2, 64, 128)
    assert (loaded.num_heads, loaded.num_kv_heads, loaded.head_dim, loaded.vocab_size) == (4, 2, 16, 256)
    assert loaded.rope_theta == 500000.0
    assert loaded.rms_norm_eps == pytest.approx(1e-6)
    assert loaded.max_position_embeddings == config.max_position_embeddings
    assert loaded.bos_token_id == 1
    # The end-of-turn token stops generation as well as eos.
    assert loaded.eos_token_ids == (7, 9)
    metadata = checkpoint.metadata
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2
    assert isinstance(metadata["llama.rope.freq_base"], float)
    assert metadata["tokenizer.chat_template"] == "{{ x }}"
    assert not any(key.startswith("GGUF.") for key in metadata)


def test_linear_rope_scaling_parsed(tmp_path: Path) -> None:
    scaling = RopeScaling(kind="linear", factor=4.0, original_max_position_embeddings=2048)
    config = tiny_config(rope_scaling=scaling)
    checkpoint = load_checkpoint(
        write_gguf_checkpoint(tmp_path / "t.gguf", config, random_state_dict(config))
    )
    assert checkpoint.metadata["llama.rope.scaling.type"] == "linear"
    assert checkpoint.config.rope_scaling == scaling
    assert "rope.freq_factors" not in checkpoint.tensors


def test_llama3_rope_scaling_becomes_freq_factors(tmp_path: Path) -> None:
    scaling = RopeScaling(kind="llama3", factor=8.0, original_max_position_embeddings=64)
    config = tiny_config(rope_scaling=scaling, rope_theta=500000.0)
    checkpoint = load_checkpoint(
        write_gguf_checkpoint(tmp_path / "t.gguf", config, random_state_dict(config))
    )
    # As llama.cpp writes it: no scaling keys, per-frequency divisors in rope_freqs.weight.
    assert checkpoint.config.rope_scaling is None
    factors = checkpoint.load("rope.freq_factors")
    assert factors.shape == (config.head_dim // 2,)
    assert torch.equal(factors, llama3_freq_factors(config))
    assert factors[0] == 1.0 and factors[-1] == 8.0  # both ends of the llama3 ramp are reached


def test_loaded_tensor_does_not_alias_the_file(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    checkpoint = load_checkpoint(write_gguf_checkpoint(tmp_path / "t.gguf", config, state))
    checkpoint.load("embed.weight").zero_()
    assert torch.equal(checkpoint.load("embed.weight"), state["embed.weight"])


# --- validation errors -------------------------------------------------------------------------


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    config = tiny_config()
    return write_gguf_checkpoint(tmp_path / "tiny.gguf", config, random_state_dict(config))


def test_bad_magic(gguf_file: Path) -> None:
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"GGML"
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad magic") as error:
        load_checkpoint(gguf_file)
    assert error.value.file == str(gguf_file)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="bad magic") as error:
        load_checkpoint(empty)
    assert error.value.file == str(empty)


@pytest.mark.parametrize("keep", [200, 2000, -3000])
def test_truncated_file(gguf_file: Path, keep: int) -> None:
    """Cut inside the metadata, inside the tensor table, and inside the last tensors' data."""
    size = gguf_file.stat().st_size
    os.truncate(gguf_file, keep if keep > 0 else size + keep)
    with pytest.raises(CheckpointError, match="truncated or corrupted") as error:
        load_checkpoint(gguf_file)
    assert error.value.file == str(gguf_file)


def test_file_truncated_after_opening_fails_on_load(gguf_file: Path) -> None:
    checkpoint = load_checkpoint(gguf_file)
    os.truncate(gguf_file, gguf_file.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="changed on disk") as error:
        checkpoint.load("lm_head.weight")
    assert error.value.file == str(gguf_file)
    assert error.value.tensor == "output.weight"


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(
        tmp_path / "t.gguf", config, random_state_dict(config), metadata={"general.architecture": "qwen2"}
    )
    with pytest.raises(CheckpointError, match="unsupported architecture 'qwen2'") as error:
        load_checkpoint(file)
    assert error.value.file == str(file)


def test_missing_metadata_key(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(
        tmp_path / "t.gguf", config, random_state_dict(config), metadata={"llama.block_count": None}
    )
    with pytest.raises(CheckpointError, match=r"missing required metadata key 'llama\.block_count'") as error:
        load_checkpoint(file)
    assert str(error.value).startswith(str(file))


def test_malformed_metadata_value(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(
        tmp_path / "t.gguf", config, random_state_dict(config), metadata={"llama.embedding_length": "wide"}
    )
    with pytest.raises(CheckpointError, match=r"malformed metadata value: .*wide") as error:
        load_checkpoint(file)
    assert error.value.file == str(file)


def test_unsupported_quantisation_type(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(
        tmp_path / "t.gguf", config, random_state_dict(config), qtype={"layers.1.mlp.up.weight": "Q5_0"}
    )
    with pytest.raises(CheckpointError, match="unsupported tensor type Q5_0") as error:
        load_checkpoint(file)
    assert error.value.tensor == "blk.1.ffn_up.weight"
    assert error.value.file == str(file)
    for supported in SUPPORTED_GGUF_TYPES:
        assert supported in str(error.value)


def test_shape_contradicting_metadata(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    state["layers.0.mlp.up.weight"] = torch.zeros(96, config.hidden_size)
    file = write_gguf_checkpoint(tmp_path / "t.gguf", config, state)
    with pytest.raises(
        CheckpointError, match=r"shape \[96, 64\] contradicts the metadata.*\[128, 64\]"
    ) as error:
        load_checkpoint(file)
    assert error.value.tensor == "blk.0.ffn_up.weight"


def test_required_tensor_missing(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    del state["layers.1.attn_norm.weight"]
    file = write_gguf_checkpoint(tmp_path / "t.gguf", config, state)
    with pytest.raises(CheckpointError, match="required tensor is missing") as error:
        load_checkpoint(file)
    assert error.value.tensor == "blk.1.attn_norm.weight"
    assert error.value.file == str(file)


@pytest.mark.parametrize("extra", ["blk.0.attn_q.bias", "blk.2.ffn_up.weight", "blk.0.ffn_gate_inp.weight"])
def test_unexpected_tensor(tmp_path: Path, extra: str) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    state[extra] = torch.zeros(64)
    file = write_gguf_checkpoint(tmp_path / "t.gguf", config, state)
    with pytest.raises(CheckpointError, match="unexpected tensor") as error:
        load_checkpoint(file)
    assert error.value.tensor == extra


def test_tensor_shapes_are_canonical(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(tmp_path / "t.gguf", config, random_state_dict(config))
    checkpoint = load_checkpoint(file)
    assert {name: source.shape for name, source in checkpoint.tensors.items()} == canonical_shapes(config)


def _to_file_order(name: str, weight: np.ndarray, config: ModelConfig) -> np.ndarray:
    if name.endswith("attn.q.weight"):
        return llama_cpp_permute(weight, config.num_heads)
    if name.endswith("attn.k.weight"):
        return llama_cpp_permute(weight, config.num_kv_heads)
    return weight
