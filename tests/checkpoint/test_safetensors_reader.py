"""Hugging Face safetensors checkpoints: round trips, metadata, and every validation error."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
from ttedge.checkpoint import CheckpointError, canonical_shapes, load_checkpoint
from ttedge.config import RopeScaling


def _round_trip(directory: Path, *, sharded: bool) -> None:
    config = tiny_config()
    state = random_state_dict(config, seed=1)
    write_hf_checkpoint(directory, config, state, sharded=sharded)
    checkpoint = load_checkpoint(directory)
    assert checkpoint.format == "safetensors"
    assert checkpoint.tokenizer_path == directory
    assert set(checkpoint.tensors) == set(state)
    for name, expected in state.items():
        loaded = checkpoint.load(name)
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, expected), name


def test_single_file_round_trip(tmp_path: Path) -> None:
    _round_trip(tmp_path, sharded=False)


def test_sharded_round_trip(tmp_path: Path) -> None:
    _round_trip(tmp_path, sharded=True)
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3


def test_config_matches_written_config(tmp_path: Path) -> None:
    config = tiny_config(num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=50000.0)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    loaded = load_checkpoint(tmp_path).config
    assert loaded == dataclasses.replace(config, name=tmp_path.name)


def test_bf16_loads_as_float32_or_kept(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config, seed=2)
    write_hf_checkpoint(tmp_path, config, state, dtype=torch.bfloat16)
    checkpoint = load_checkpoint(tmp_path)
    kept = load_checkpoint(tmp_path, keep_dtype=True)
    for name, expected in state.items():
        assert checkpoint[name].stored_dtype == "BF16"
        rounded = expected.to(torch.bfloat16)
        assert torch.equal(checkpoint.load(name), rounded.float()), name
        assert kept.load(name).dtype == torch.bfloat16
        assert torch.equal(kept.load(name), rounded), name


def test_loaded_tensor_does_not_alias_the_file(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    write_hf_checkpoint(tmp_path, config, state)
    checkpoint = load_checkpoint(tmp_path)
    checkpoint.load("embed.weight").zero_()
    assert torch.equal(checkpoint.load("embed.weight"), state["embed.weight"])


def test_tied_embeddings(tmp_path: Path) -> None:
    config = tiny_config(tie_word_embeddings=True)
    state = random_state_dict(config)
    assert "lm_head.weight" not in state
    write_hf_checkpoint(tmp_path, config, state)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.config.tie_word_embeddings
    assert "lm_head.weight" not in checkpoint.tensors


def test_tied_checkpoint_that_also_stores_lm_head_drops_it(tmp_path: Path) -> None:
    config = tiny_config(tie_word_embeddings=True)
    state = random_state_dict(config)
    state["lm_head.weight"] = state["embed.weight"].clone()
    write_hf_checkpoint(tmp_path, config, state)
    assert "lm_head.weight" not in load_checkpoint(tmp_path).tensors


def test_untied_config_without_lm_head_names_it(tmp_path: Path) -> None:
    config = tiny_config(tie_word_embeddings=False)
    state = random_state_dict(config)
    del state["lm_head.weight"]
    write_hf_checkpoint(tmp_path, config, state)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*tie_word_embeddings") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(tmp_path / "model.safetensors")
    assert error.value.tensor == "lm_head.weight"


@pytest.mark.parametrize(
    "scaling",
    [
        RopeScaling(kind="linear", factor=4.0),
        RopeScaling(
            kind="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=128,
        ),
    ],
)
def test_rope_scaling_parsed(tmp_path: Path, scaling: RopeScaling) -> None:
    config = tiny_config(rope_scaling=scaling)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    assert load_checkpoint(tmp_path).config.rope_scaling == scaling


@pytest.mark.parametrize(
    ("parameters", "scaling"),
    [
        ({"rope_type": "default"}, None),
        ({"rope_type": "linear", "factor": 2.0}, RopeScaling(kind="linear", factor=2.0)),
    ],
)
def test_transformers_5_rope_parameters(
    hf_dir: Path, parameters: dict[str, object], scaling: RopeScaling | None
) -> None:
    config_file = hf_dir / "config.json"
    hf = json.loads(config_file.read_text())
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_theta": 123456.0, **parameters}
    config_file.write_text(json.dumps(hf))
    loaded = load_checkpoint(hf_dir).config
    assert loaded.rope_theta == 123456.0
    assert loaded.rope_scaling == scaling


def test_generation_config_adds_eos_ids(tmp_path: Path) -> None:
    config = tiny_config(bos_token_id=None, eos_token_ids=(2,))
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.eos_token_ids == (2, 7)
    assert loaded.config.bos_token_id == 1
    assert loaded.metadata["generation_config"] == {"bos_token_id": 1, "eos_token_id": [2, 7]}


def test_tokenizer_config_and_chat_template_in_metadata(tmp_path: Path) -> None:
    config = tiny_config()
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    assert load_checkpoint(tmp_path).metadata["tokenizer_config"] == {}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert load_checkpoint(tmp_path).metadata["tokenizer_config"] == {
        "eos_token": "</s>",
        "chat_template": "{{ messages }}",
    }
    # A template inside tokenizer_config.json wins over the separate file.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "inline"}))
    assert load_checkpoint(tmp_path).metadata["tokenizer_config"] == {"chat_template": "inline"}


def test_rotary_inv_freq_buffers_are_ignored(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    write_hf_checkpoint(tmp_path, config, state)
    assert set(load_checkpoint(tmp_path).tensors) == set(canonical_shapes(config))


# --- validation errors -------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    config = tiny_config()
    return write_hf_checkpoint(tmp_path / "model", config, random_state_dict(config))


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_is_named(hf_dir: Path, missing: str) -> None:
    (hf_dir / missing).unlink()
    with pytest.raises(CheckpointError, match="missing") as error:
        load_checkpoint(hf_dir)
    assert error.value.file == str(hf_dir / missing)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    config = tiny_config()
    write_hf_checkpoint(tmp_path, config, random_state_dict(config), sharded=True)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"shard named in model\.safetensors\.index\.json") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(shard)


def test_shard_lacking_an_indexed_tensor(tmp_path: Path) -> None:
    config = tiny_config()
    write_hf_checkpoint(tmp_path, config, random_state_dict(config), sharded=True)
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors"
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in this shard") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(tmp_path / "model-00001-of-00003.safetensors")
    assert error.value.tensor in ("model.norm.weight", "model.layers.0.mlp.up_proj.weight")


def test_unsupported_architecture(hf_dir: Path) -> None:
    config_file = hf_dir / "config.json"
    hf = json.loads(config_file.read_text())
    hf.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    config_file.write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"unsupported architecture.*qwen2") as error:
        load_checkpoint(hf_dir)
    assert error.value.file == str(config_file)
    assert str(error.value).startswith(str(config_file))


def test_malformed_config_json(hf_dir: Path) -> None:
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable JSON") as error:
        load_checkpoint(hf_dir)
    assert error.value.file == str(hf_dir / "config.json")


def test_header_garbage(hf_dir: Path) -> None:
    weights = hf_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00garbage garbage garbage garbage"[:32]
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as error:
        load_checkpoint(hf_dir)
    assert error.value.file == str(weights)


def test_data_shorter_than_declared(hf_dir: Path) -> None:
    weights = hf_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated or corrupted") as error:
        load_checkpoint(hf_dir)
    assert error.value.file == str(weights)


def test_file_truncated_after_opening_fails_on_load(hf_dir: Path) -> None:
    checkpoint = load_checkpoint(hf_dir)
    weights = hf_dir / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="changed on disk") as error:
        checkpoint.load("lm_head.weight")
    assert error.value.file == str(weights)
    assert error.value.tensor == "lm_head.weight"


def test_shape_contradicting_config(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    state["layers.1.attn.k.weight"] = torch.zeros(48, config.hidden_size)
    write_hf_checkpoint(tmp_path, config, state)
    with pytest.raises(
        CheckpointError, match=r"shape \[48, 64\] contradicts config.json.*\[32, 64\]"
    ) as error:
        load_checkpoint(tmp_path)
    assert error.value.tensor == "model.layers.1.self_attn.k_proj.weight"
    assert error.value.file == str(tmp_path / "model.safetensors")


def test_required_tensor_missing(tmp_path: Path) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    del state["layers.1.mlp.up.weight"]
    write_hf_checkpoint(tmp_path, config, state, sharded=True)
    with pytest.raises(CheckpointError, match="required tensor is missing") as error:
        load_checkpoint(tmp_path)
    assert error.value.tensor == "model.layers.1.mlp.up_proj.weight"
    assert error.value.file == str(tmp_path / "model.safetensors.index.json")


@pytest.mark.parametrize(
    "extra", ["model.layers.0.self_attn.q_proj.bias", "model.layers.2.mlp.up_proj.weight", "score.weight"]
)
def test_unexpected_tensor(tmp_path: Path, extra: str) -> None:
    config = tiny_config()
    state = random_state_dict(config)
    state[extra] = torch.zeros(4)
    write_hf_checkpoint(tmp_path, config, state)
    with pytest.raises(CheckpointError, match="unexpected tensor") as error:
        load_checkpoint(tmp_path)
    assert error.value.tensor == extra


def test_unsupported_dtype(hf_dir: Path) -> None:
    weights = hf_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int8)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="unsupported dtype I8") as error:
        load_checkpoint(hf_dir)
    assert error.value.tensor == "model.norm.weight"
