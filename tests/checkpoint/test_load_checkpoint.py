"""``load_checkpoint`` path resolution, and the checkpoints written with a real tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from tests.fixtures.tiny_checkpoints import (
    SMOLLM2_VOCAB_SIZE,
    random_state_dict,
    smollm2_gguf_path,
    tiny_config,
    write_gguf_checkpoint,
    write_hf_checkpoint,
)
from ttedge.checkpoint import CheckpointError, canonical_shapes, load_checkpoint


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or directory; expected a Hugging Face") as error:
        load_checkpoint(tmp_path / "nowhere")
    assert error.value.file == str(tmp_path / "nowhere")


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"not a \.gguf file") as error:
        load_checkpoint(weights)
    assert error.value.file == str(weights)


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"neither config\.json nor a \.gguf file") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(tmp_path)


def test_safetensors_without_config_names_config_json(tmp_path: Path) -> None:
    config = tiny_config()
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(tmp_path / "config.json")


def test_directory_with_one_gguf(tmp_path: Path) -> None:
    config = tiny_config()
    file = write_gguf_checkpoint(tmp_path / "model.gguf", config, random_state_dict(config))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.format == "gguf"
    assert checkpoint.path == file


def test_directory_with_several_ggufs(tmp_path: Path) -> None:
    config = tiny_config()
    write_gguf_checkpoint(tmp_path / "a.gguf", config, random_state_dict(config))
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)") as error:
        load_checkpoint(tmp_path)
    assert error.value.file == str(tmp_path)


def test_byte_level_tokenizer_of_tiny_hf_checkpoints(tmp_path: Path) -> None:
    config = tiny_config()
    write_hf_checkpoint(tmp_path, config, random_state_dict(config))
    tokenizer = Tokenizer.from_file(str(load_checkpoint(tmp_path).tokenizer_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == config.vocab_size
    text = "héllo, wörld"
    ids = tokenizer.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_real_tokenizer_needs_its_vocab_size(tmp_path: Path) -> None:
    config = tiny_config()
    with pytest.raises(ValueError, match="vocab_size=49152"):
        write_gguf_checkpoint(
            tmp_path / "t.gguf", config, random_state_dict(config), tokenizer_from=Path("x")
        )


@pytest.mark.slow
def test_smollm2_gguf() -> None:
    checkpoint = load_checkpoint(smollm2_gguf_path())
    config = checkpoint.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings
    assert config.rope_theta == 100000.0
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert checkpoint.metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(checkpoint.metadata["tokenizer.ggml.tokens"]) == 49152  # type: ignore[arg-type]
    assert "<|im_start|>" in checkpoint.metadata["tokenizer.chat_template"]  # type: ignore[operator]
    expected = canonical_shapes(config)
    assert set(checkpoint.tensors) == set(expected)
    for name, shape in expected.items():
        tensor = checkpoint.load(name)
        assert tensor.shape == shape, name
        assert tensor.dtype == torch.float32
    assert checkpoint["layers.0.attn.q.weight"].stored_dtype == "Q4_1"
    assert checkpoint["embed.weight"].stored_dtype == "Q8_0"


@pytest.mark.slow
def test_tiny_gguf_with_smollm2_tokenizer(tmp_path: Path) -> None:
    config = tiny_config(vocab_size=SMOLLM2_VOCAB_SIZE, tie_word_embeddings=True)
    state = random_state_dict(config)
    file = write_gguf_checkpoint(tmp_path / "t.gguf", config, state, tokenizer_from=smollm2_gguf_path())
    checkpoint = load_checkpoint(file)
    metadata = checkpoint.metadata
    tokens = metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, list) and len(tokens) == SMOLLM2_VOCAB_SIZE
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(metadata["tokenizer.ggml.merges"]) == 48900  # type: ignore[arg-type]
    assert len(metadata["tokenizer.ggml.token_type"]) == SMOLLM2_VOCAB_SIZE  # type: ignore[arg-type]
    assert (metadata["tokenizer.ggml.model"], metadata["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert "<|im_start|>" in metadata["tokenizer.chat_template"]  # type: ignore[operator]
    assert (checkpoint.config.bos_token_id, checkpoint.config.eos_token_ids) == (1, (2,))
    assert checkpoint.config.vocab_size == SMOLLM2_VOCAB_SIZE
    assert torch.equal(checkpoint.load("embed.weight"), state["embed.weight"])


@pytest.mark.slow
def test_tiny_hf_with_smollm2_tokenizer(tmp_path: Path) -> None:
    config = tiny_config(vocab_size=SMOLLM2_VOCAB_SIZE)
    write_hf_checkpoint(tmp_path, config, random_state_dict(config), tokenizer_from=smollm2_gguf_path())
    checkpoint = load_checkpoint(tmp_path)
    assert "<|im_start|>" in checkpoint.metadata["tokenizer_config"]["chat_template"]  # type: ignore[index]
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == SMOLLM2_VOCAB_SIZE
    assert tokenizer.token_to_id("<|im_end|>") == 2
