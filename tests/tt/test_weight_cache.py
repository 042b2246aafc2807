"""The on-disk cache of converted weights (ttedge.models.llama.tt.weight_cache) with ttnn's own conversion,
``dump_tensor`` and ``load_tensor``: a second conversion converts nothing and reads no checkpoint weight;
a change of preset, mesh, checkpoint file or configuration never finds a stale file; corrupted, truncated
and unfinished files are converted again, with a warning naming them. Then the whole model built from the
cache on a mock n150, and ``ttedge convert`` itself where torch is installed.

Host conversions are real (bytes and block-float rounding are ttnn's); the device run is mock validation
(no numerics).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import ttnn

from tests.tt.conftest import MOCK_DIR
from tests.tt.support import BATCH, SMOLLM2_PRESET, TINY, decode_page_table, random_weights
from ttedge.model_zoo import PrecisionPreset, find_card
from ttedge.models.llama.tt import weight_cache
from ttedge.models.llama.tt.model import Transformer
from ttedge.models.llama.tt.weight_cache import SINGLE_CHIP, WeightCache, model_identity
from ttedge.models.llama.tt.weights import ModelTensors, convert_model

# Seven tensors per layer (two norms, QKV, WO, w1, w3, w2), then embedding, final norm and LM head.
TENSORS = 7 * TINY.num_layers + 3
# bfloat8_b throughout (SmolLM2's performance preset), and tt_transformers' performance mode: bfloat4_b
# gate/up projections, bfloat8_b elsewhere.
BFLOAT8 = SMOLLM2_PRESET
_llama = find_card("llama-3.2-1b-instruct")
assert _llama is not None
BFLOAT4_MLP: PrecisionPreset = _llama.tt.preset("performance")


class ReadRecorder(Mapping[str, np.ndarray]):
    """A checkpoint's tensors that remember which were read."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = tensors
        self.read: list[str] = []

    def __getitem__(self, name: str) -> np.ndarray:
        self.read.append(name)
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@pytest.fixture
def host_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    # ttnn's block-float conversion asks the driver for the chips even on the host.
    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "n150.yaml"))


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    """Stands in for the checkpoint the tensors came from: its path, size and mtime are the identity."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"weights")
    return path


def open_cache(root: Path, checkpoint: Path, mesh_shape: tuple[int, int] = SINGLE_CHIP) -> WeightCache:
    return WeightCache(root, model_identity(TINY, [checkpoint]), mesh_shape)


def all_tensors(model: ModelTensors) -> dict[str, ttnn.Tensor]:
    named = {f"layers.{i}.{k}": v for i, layer in enumerate(model.layers) for k, v in vars(layer).items()}
    return named | {k: v for k, v in vars(model).items() if k != "layers"}


@pytest.mark.usefixtures("host_conversion")
def test_second_conversion_loads_every_tensor_and_reads_no_weight(
    tmp_path: Path, checkpoint_file: Path
) -> None:
    weights = random_weights(TINY)
    progress: list[tuple[int, int]] = []
    first = open_cache(tmp_path, checkpoint_file)
    converted = convert_model(TINY, weights, BFLOAT4_MLP, first, lambda *p: progress.append(p))
    assert (first.converted, first.loaded) == (TENSORS, 0)
    assert progress == [(1, 3), (2, 3), (3, 3)]  # each layer, then embedding, norm and head

    recorder = ReadRecorder(weights)
    second = open_cache(tmp_path, checkpoint_file)
    cached = convert_model(TINY, recorder, BFLOAT4_MLP, second)
    # The proof that nothing was converted: no checkpoint tensor was even read, every tensor was loaded.
    assert (second.converted, second.loaded, recorder.read) == (0, TENSORS, [])
    fresh, loaded = all_tensors(converted), all_tensors(cached)
    assert fresh.keys() == loaded.keys()
    for name, tensor in fresh.items():
        back = loaded[name]
        assert (back.dtype, back.layout, back.shape) == (tensor.dtype, tensor.layout, tensor.shape), name
        if tensor.dtype in (ttnn.bfloat8_b, ttnn.bfloat4_b):  # numpy has no bfloat16 to compare with
            np.testing.assert_array_equal(back.to_numpy(), tensor.to_numpy(), err_msg=name)
    assert cached.layers[0].w1.dtype == ttnn.bfloat4_b and cached.layers[0].w2.dtype == ttnn.bfloat8_b


@pytest.mark.usefixtures("host_conversion")
def test_a_change_of_preset_converts_only_the_tensors_whose_format_changed(
    tmp_path: Path, checkpoint_file: Path
) -> None:
    convert_model(TINY, random_weights(TINY), BFLOAT8, open_cache(tmp_path, checkpoint_file))
    recorder = ReadRecorder(random_weights(TINY))
    cache = open_cache(tmp_path, checkpoint_file)
    model = convert_model(TINY, recorder, BFLOAT4_MLP, cache)
    # w1 and w3 of each layer drop to bfloat4_b; everything else is the same bfloat8_b/bfloat16 file.
    assert (cache.converted, cache.loaded) == (2 * TINY.num_layers, TENSORS - 2 * TINY.num_layers)
    assert all(layer.w1.dtype == layer.w3.dtype == ttnn.bfloat4_b for layer in model.layers)
    assert {"layers.0.mlp.gate.weight", "layers.1.mlp.up.weight"} <= set(recorder.read)


def test_the_key_changes_with_checkpoint_file_config_mesh_and_format(
    tmp_path: Path, checkpoint_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = open_cache(tmp_path, checkpoint_file).directory
    assert directory == open_cache(tmp_path, checkpoint_file).directory
    assert open_cache(tmp_path, checkpoint_file, (1, 2)).directory != directory
    other_config = WeightCache(
        tmp_path, model_identity(dataclasses.replace(TINY, num_heads=2), [checkpoint_file]), SINGLE_CHIP
    )
    assert other_config.directory.parent != directory.parent
    checkpoint_file.write_bytes(b"weights, rewritten")  # size and modification time change
    assert open_cache(tmp_path, checkpoint_file).directory.parent != directory.parent
    changed = open_cache(tmp_path, checkpoint_file).directory
    monkeypatch.setattr(weight_cache, "CACHE_FORMAT", weight_cache.CACHE_FORMAT + 1)
    assert open_cache(tmp_path, checkpoint_file).directory != changed
    assert directory.name == "mesh1x1" and directory.parent.name.startswith("tiny-llama-")
    assert (directory.parent / "identity.json").is_file()


@pytest.mark.usefixtures("host_conversion")
def test_corrupt_truncated_and_unfinished_files_are_converted_again(
    tmp_path: Path, checkpoint_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = random_weights(TINY)
    first = open_cache(tmp_path, checkpoint_file)
    convert_model(TINY, weights, BFLOAT8, first)
    wqkv = first.path("layers.0.wqkv", ttnn.bfloat8_b, ttnn.TILE_LAYOUT)
    w2 = first.path("layers.1.w2", ttnn.bfloat8_b, ttnn.TILE_LAYOUT)
    lm_head = first.path("lm_head", ttnn.bfloat8_b, ttnn.TILE_LAYOUT)

    data = bytearray(wqkv.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wqkv.write_bytes(data)
    # ttnn alone would not notice: a flipped byte of tensor data loads without complaint.
    assert ttnn.load_tensor(wqkv).shape == ttnn.Shape([1, 1, TINY.hidden_size, 256])
    w2.write_bytes(w2.read_bytes()[:1000])  # truncated
    Path(f"{lm_head}.sha256").unlink()  # the conversion stopped between the file and its digest

    with caplog.at_level(logging.WARNING, logger=weight_cache.__name__):
        second = open_cache(tmp_path, checkpoint_file)
        convert_model(TINY, weights, BFLOAT8, second)
    assert (second.converted, second.loaded) == (3, TENSORS - 3)
    warnings = "\n".join(record.getMessage() for record in caplog.records)
    assert f"{wqkv} does not match its SHA-256 (corrupted): converting it again" in warnings
    assert f"{w2} does not match its SHA-256" in warnings
    assert f"{lm_head} has no digest (an interrupted conversion?)" in warnings
    third = open_cache(tmp_path, checkpoint_file)
    convert_model(TINY, weights, BFLOAT8, third)
    assert (third.converted, third.loaded) == (0, TENSORS), "the files were repaired"
    assert not list(third.directory.glob(".*tmp*")), "no temporary file is left behind"


def test_model_decodes_from_cached_weights_on_mock_n150(
    mock_device: Callable[[str | Path], ttnn.MeshDevice], tmp_path: Path, checkpoint_file: Path
) -> None:
    """Mock validation (no numerics): tensors loaded from the cache go to the device in the memory layouts
    the modules ask for (DRAM-sharded projections, row-major embedding) and a decode step runs."""
    mesh = mock_device("n150")
    page_table, blocks = decode_page_table()
    Transformer(mesh, TINY, random_weights(TINY), BFLOAT4_MLP, blocks, open_cache(tmp_path, checkpoint_file))
    recorder = ReadRecorder(random_weights(TINY))
    cache = open_cache(tmp_path, checkpoint_file)
    model = Transformer(mesh, TINY, recorder, BFLOAT4_MLP, blocks, cache)
    assert (cache.converted, cache.loaded) == (0, TENSORS)
    assert recorder.read == ["rope.freq_factors"]  # looked for (absent here), never a weight
    w1 = model.layers[0].mlp.w1.weight
    assert w1.dtype == ttnn.bfloat4_b
    assert w1.memory_config().memory_layout == ttnn.TensorMemoryLayout.WIDTH_SHARDED
    positions = np.arange(BATCH, dtype=np.int32)
    logits = model.decode(np.zeros(BATCH, np.uint32), positions, page_table)
    assert logits.shape == ttnn.Shape([1, 1, BATCH, 1024])


def test_ttedge_convert_converts_once_then_finds_everything_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command itself on a Hugging Face checkpoint it reads (needs torch: setup_tt.sh --with-torch)."""
    pytest.importorskip("torch", reason="ttedge.checkpoint needs torch: setup_tt.sh --with-torch")
    from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint
    from ttedge.cli import main

    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "n150.yaml"))
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    model = write_hf_checkpoint(tmp_path / "tiny", config, random_state_dict(config))
    command = ["convert", "--model", str(model), "--cache-dir", str(tmp_path / "cache")]
    tensors = 7 * config.num_layers + 3

    assert main(command) == 0
    assert f": {tensors} tensors converted, 0 already cached" in capsys.readouterr().out
    assert main(command) == 0
    assert f": 0 tensors converted, {tensors} already cached" in capsys.readouterr().out
    # No card matches a random tiny model: only the default preset (bfloat8_b throughout) exists for it.
    assert main([*command, "--preset", "performance"]) == 2
    assert "no model card with TT presets matches this checkpoint" in capsys.readouterr().err
