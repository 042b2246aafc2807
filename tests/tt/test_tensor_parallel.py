"""Tensor parallelism of the TT-NN port (ttedge.models.llama.tt.tensor_parallel) on the mock n300 (1x2, a
line) and T3K (1x8, a ring), opened from their ethernet_mesh topologies by the runner's own
``open_tt_device``: every weight on every chip in the shape ethernet_mesh's plan gives it, the collectives
the plan lists and no others, refusals of models that do not split, and the KV heads repeated when there
are fewer than chips.

Mock validation (no numerics): ttnn checks every op on every chip and allocates every buffer; results are
zeros. Whether the split computes the single-chip answer is tests/tt/test_numerics_emulation.py's part.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ttnn

from tests.tt.support import BATCH, BLOCK_TOKENS, SMOLLM2, SMOLLM2_PRESET, decode_page_table, random_weights
from ttedge.cli import main
from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.collectives import Collective
from ttedge.ethernet_mesh.sharding import ShardingError, TensorParallelPlan, plan_tensor_parallel
from ttedge.ethernet_mesh.topology import Mesh, get_mesh
from ttedge.model_zoo import find_card
from ttedge.models.llama.tt.attention import DecodeInputs, PrefillInputs
from ttedge.models.llama.tt.decoder import DecoderLayer
from ttedge.models.llama.tt.model import Transformer
from ttedge.models.llama.tt.model_config import ACTIVATIONS_MEMORY, PREFILL_MEMORY, DeviceSpec
from ttedge.models.llama.tt.op_timing import layer_shapes
from ttedge.models.llama.tt.rope import RotarySetup
from ttedge.models.llama.tt.rope_tables import inverse_frequencies
from ttedge.models.llama.tt.tensor_parallel import TensorParallel
from ttedge.models.llama.tt.weight_cache import WeightCache, model_identity
from ttedge.models.llama.tt.weights import (
    WeightDtypes,
    convert_layer,
    convert_model,
    host_tensor,
    prepare_layer,
    shard_layer,
)
from ttedge.runtime.tt import close_tt_device, open_tt_device

MOCK_DIR = Path(__file__).parent / "mock"
MESHES = ["n300", "t3k"]

# A small Llama that splits over 2 and 8 chips into whole tiles: 8 query heads and 2 KV heads (so on a
# T3K each KV head is repeated on four chips), MLP width and vocabulary 64 and 128 columns per chip at 8.
SMALL = ModelConfig(
    name="small-llama",
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
_LLAMA_8B = find_card("llama-3.1-8b-instruct")
assert _LLAMA_8B is not None, "the model zoo lost the Llama-3.1-8B card"
# 32 query and 8 KV heads, hidden 4096, MLP 14336: one KV head per T3K chip.
LLAMA_8B_LAYER = dataclasses.replace(_LLAMA_8B.config, num_layers=1)


@pytest.fixture
def open_mesh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ttnn.MeshDevice]]:
    """Opens a built-in mesh on its mock system (``tests/tt/mock/<name>.yaml``) with the runner's
    ``open_tt_device``, which sets the fabric; closed with ``close_tt_device`` after the test."""
    opened: list[ttnn.MeshDevice] = []

    def open_named(name: str) -> ttnn.MeshDevice:
        assert not opened, "one mock cluster per test"
        monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / f"{name}.yaml"))
        opened.append(open_tt_device(get_mesh(name)))
        return opened[0]

    yield open_named
    for device in opened:
        close_tt_device(device)


@pytest.fixture
def collectives(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Collective, Any, Any, ttnn.Topology]]:
    """Every all-reduce and all-gather issued, in order: (collective, input shape, output shape,
    topology), by wrapping ttnn's own ops."""
    issued: list[tuple[Collective, Any, Any, ttnn.Topology]] = []

    def counting(kind: Collective, op: Callable[..., ttnn.Tensor]) -> Callable[..., ttnn.Tensor]:
        def run(x: ttnn.Tensor, **kwargs: Any) -> ttnn.Tensor:
            out = op(x, **kwargs)
            issued.append((kind, x.shape, out.shape, kwargs["topology"]))
            return out

        return run

    monkeypatch.setattr(ttnn, "all_reduce", counting(Collective.ALL_REDUCE, ttnn.all_reduce))
    monkeypatch.setattr(ttnn, "all_gather", counting(Collective.ALL_GATHER, ttnn.all_gather))
    return issued


def per_chip_shapes(tensor: ttnn.Tensor) -> list[tuple[int, ...]]:
    """The shape of each chip's part of a device tensor, in chip order."""
    return [tuple(part.shape) for part in ttnn.get_device_tensors(tensor)]


def expected_counts(plan: TensorParallelPlan, tokens: int, logit_rows: int) -> Counter[Collective]:
    """How many of each collective the plan lists for one forward pass."""
    counts: Counter[Collective] = Counter()
    for call in plan.collectives(tokens, logit_rows):
        counts[call.collective] += call.count
    return counts


def issued_counts(issued: list[tuple[Collective, Any, Any, ttnn.Topology]]) -> Counter[Collective]:
    return Counter(kind for kind, *_ in issued)


def residual_update_bytes(issued: list[tuple[Collective, Any, Any, ttnn.Topology]]) -> set[int]:
    """The bfloat16 bytes of each all-reduced tensor (the plan counts the full residual-stream update)."""
    return {int(np.prod(shape)) * 2 for kind, shape, _, _ in issued if kind == Collective.ALL_REDUCE}


@pytest.mark.parametrize("name", MESHES)
def test_small_model_split_over_the_mesh_prefills_and_decodes(
    open_mesh: Callable[[str], ttnn.MeshDevice],
    collectives: list[tuple[Collective, Any, Any, ttnn.Topology]],
    name: str,
) -> None:
    topology = get_mesh(name)
    mesh = open_mesh(name)
    chips = topology.num_chips
    assert mesh.get_num_devices() == chips
    plan = plan_tensor_parallel(SMALL, chips)
    page_table, blocks = decode_page_table()
    model = Transformer(mesh, SMALL, random_weights(SMALL), SMOLLM2_PRESET, blocks, ring=topology.is_ring)

    # Every weight on every chip, in the plan's per-chip shape (the port stores linears as [in, out]).
    hidden = SMALL.hidden_size

    def transposed(weight: str) -> tuple[int, int, int, int]:
        rows, cols = plan.weight(weight).per_device_shape
        return (1, 1, cols, rows)

    qkv_width = sum(plan.weight(w).per_device_shape[0] for w in ("q", "k", "v"))
    for layer in model.layers:
        attention, mlp = layer.attention, layer.mlp
        assert per_chip_shapes(attention.wqkv.weight) == [(1, 1, hidden, qkv_width)] * chips
        assert per_chip_shapes(attention.wo.weight) == [transposed("o")] * chips
        assert per_chip_shapes(mlp.w1.weight) == [transposed("gate")] * chips
        assert per_chip_shapes(mlp.w3.weight) == [transposed("up")] * chips
        assert per_chip_shapes(mlp.w2.weight) == [transposed("down")] * chips
        assert per_chip_shapes(layer.attn_norm.weight) == [(1, 1, hidden // 32, 32)] * chips
        # Each chip's KV cache holds its own KV heads only.
        cache = (blocks, plan.kv_heads_per_device, BLOCK_TOKENS, SMALL.head_dim)
        assert per_chip_shapes(attention.k_cache) == [cache] * chips
        assert attention.num_heads == plan.query_heads_per_device
    assert (
        per_chip_shapes(model.embedding.weight)
        == [(1, 1, *plan.weight("embedding").per_device_shape)] * chips
    )
    assert per_chip_shapes(model.lm_head.weight) == [transposed("lm_head")] * chips

    # Prefill of 40 tokens (padded to 64 rows), then a chunk at 64 attending to the cache.
    prompt = np.arange(70, dtype=np.uint32) % SMALL.vocab_size
    full_vocab = ttnn.Shape([1, 1, 32, SMALL.vocab_size])
    assert model.prefill(prompt[:40], page_table[0]).shape == full_vocab
    assert issued_counts(collectives) == expected_counts(plan, 64, 1)
    assert residual_update_bytes(collectives) == {
        call.bytes for call in plan.prefill_collectives(64) if call.collective == Collective.ALL_REDUCE
    }
    collectives.clear()
    assert model.prefill(prompt[40:], page_table[0], start=64, all_rows=True).shape == full_vocab
    assert issued_counts(collectives) == expected_counts(plan, 32, 32)
    collectives.clear()

    positions = np.arange(BATCH, dtype=np.int32) + 30
    tokens = np.arange(BATCH, dtype=np.uint32)
    logits = model.decode(tokens, positions, page_table)
    # The logits are gathered over the vocabulary: every chip holds all of them.
    assert per_chip_shapes(logits) == [(1, 1, BATCH, SMALL.vocab_size)] * chips
    assert issued_counts(collectives) == expected_counts(plan, BATCH, BATCH)
    assert residual_update_bytes(collectives) == {
        call.bytes for call in plan.decode_collectives(BATCH) if call.collective == Collective.ALL_REDUCE
    }
    expected_topology = ttnn.Topology.Ring if name == "t3k" else ttnn.Topology.Linear
    assert {used for *_, used in collectives} == {expected_topology}
    greedy = model.decode(tokens, positions + 1, page_table, greedy=True)
    assert per_chip_shapes(greedy) == [(1, 1, BATCH)] * chips


def test_llama_8b_decoder_layer_split_over_the_t3k(
    open_mesh: Callable[[str], ttnn.MeshDevice],
    collectives: list[tuple[Collective, Any, Any, ttnn.Topology]],
) -> None:
    """One Llama-3.1-8B decoder layer, decode and a 128-token prefill, one KV head per chip (on the n300
    the same layer differs only in the widths, which the small model's test covers; kept off to spare
    the tier about 40 s)."""
    topology = get_mesh("t3k")
    mesh = open_mesh("t3k")
    config = LLAMA_8B_LAYER
    tp = TensorParallel.over(config, topology.num_chips, topology.is_ring)
    plan = tp.plan
    dtypes = WeightDtypes.from_preset(SMOLLM2_PRESET, 0)
    spec = DeviceSpec.of(mesh)
    page_table, blocks = decode_page_table()
    # Zeros rather than random values: the mock computes nothing, and they cost no time to make.
    zeros = {name: np.zeros(shape, np.float32) for name, shape in layer_shapes(config).items()}
    weights = convert_layer(config, zeros, dtypes, 0, plan=plan)
    layer = DecoderLayer(mesh, spec, config, weights, dtypes.kv_cache, blocks, tp=tp)
    assert layer.attention.num_kv_heads == plan.kv_heads_per_device == max(8 // topology.num_chips, 1)
    assert (
        per_chip_shapes(layer.mlp.w2.weight)
        == [(1, 1, 14336 // topology.num_chips, 4096)] * mesh.get_num_devices()
    )
    rope = RotarySetup(mesh, spec, config, inverse_frequencies(config))

    positions = np.arange(BATCH, dtype=np.int32) * 3
    step = DecodeInputs.one_user_per_slot(mesh, rope, positions, page_table)
    x = host_tensor(np.zeros((1, 1, BATCH, 4096), np.float32), ttnn.bfloat16).to(mesh, ACTIVATIONS_MEMORY)
    assert per_chip_shapes(layer(x, step)) == [(1, 1, BATCH, 4096)] * topology.num_chips
    rows = 128
    prefill = PrefillInputs(
        start=0,
        fill_page_table=host_tensor(page_table[None, 0, :4], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(mesh),
        page_table=host_tensor(page_table[None, 0], ttnn.int32, ttnn.ROW_MAJOR_LAYOUT).to(mesh),
        rotary=rope.for_prefill(0, rows),
    )
    prompt = host_tensor(np.zeros((1, 1, rows, 4096), np.float32), ttnn.bfloat16).to(mesh, PREFILL_MEMORY)
    assert layer.prefill(prompt, prefill).shape == ttnn.Shape([1, 1, rows, 4096])
    # Two all-reduces per layer and step, of the whole residual-stream update.
    assert [kind for kind, *_ in collectives] == [Collective.ALL_REDUCE] * 4
    decode_bytes, prefill_bytes = (BATCH * 4096 * 2, rows * 4096 * 2)
    assert [int(np.prod(shape)) * 2 for _, shape, _, _ in collectives] == [decode_bytes] * 2 + [
        prefill_bytes
    ] * 2


@pytest.mark.parametrize("name", MESHES)
def test_a_model_that_does_not_split_is_refused_before_its_weights_are_read(
    open_mesh: Callable[[str], ttnn.MeshDevice], name: str
) -> None:
    """SmolLM2-135M's 9 query and 3 KV heads split over neither 2 nor 8 chips."""
    mesh = open_mesh(name)

    class Untouchable(dict[str, np.ndarray]):
        def __getitem__(self, key: str) -> np.ndarray:
            raise AssertionError(f"read {key} before refusing")

    with pytest.raises(ShardingError, match=f"9 query heads do not divide over {mesh.get_num_devices()}"):
        Transformer(mesh, SMOLLM2, Untouchable(), SMOLLM2_PRESET, 8)


@pytest.fixture
def nine_heads_checkpoint(tmp_path: Path) -> Path:
    """A Hugging Face checkpoint with SmolLM2-135M's 9 query and 3 KV heads, tiny otherwise."""
    pytest.importorskip("torch", reason="ttedge.checkpoint needs torch: setup_tt.sh --with-torch")
    from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint

    config = tiny_config(hidden_size=288, num_heads=9, num_kv_heads=3, num_layers=1)
    return write_hf_checkpoint(tmp_path / "nine-heads", config, random_state_dict(config))


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ("n300", "--mesh n300: nine-heads at TP=2: 9 query heads do not divide over 2 devices"),
        ("t3k", "--mesh t3k: nine-heads at TP=8: 9 query heads do not divide over 8 devices; 3 KV heads"),
        ("t3k-2x4", "--mesh: t3k-2x4 is 2x4: the TT port splits a model over one row of chips"),
        ("missing.yaml", "missing.yaml: cannot read"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "convert"])
def test_cli_refuses_a_mesh_before_opening_a_device_or_converting(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    nine_heads_checkpoint: Path,
    mesh: str,
    message: str,
    command: str,
) -> None:
    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "t3k.yaml"))
    monkeypatch.setenv("TTEDGE_TT_CACHE", str(tmp_path / "cache"))

    def no_device(*args: object) -> None:
        raise AssertionError("a device was opened")

    monkeypatch.setattr("ttedge.runtime.tt.open_tt_device", no_device)
    mesh_arg = str(tmp_path / mesh) if mesh.endswith(".yaml") else mesh
    args = ["--model", str(nine_heads_checkpoint), "--mesh", mesh_arg]
    if command == "generate":
        args += ["--device", "tt", "--prompt", "hi"]
    assert main([command, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cli_converts_then_generates_on_the_n300(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """``ttedge convert --mesh n300`` fills the cache's 1x2 directory with each chip's slices; ``ttedge
    generate --device tt --mesh n300`` then opens the 1x2 mesh from the topology, loads every weight from
    the cache and generates (the mock's logits are zeros: the tokens say nothing, their count does)."""
    pytest.importorskip("torch", reason="ttedge.checkpoint needs torch: setup_tt.sh --with-torch")
    from tests.fixtures.tiny_checkpoints import random_state_dict, tiny_config, write_hf_checkpoint

    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "n300.yaml"))
    monkeypatch.setenv("TTEDGE_TT_CACHE", str(tmp_path / "cache"))
    config = tiny_config(hidden_size=128, num_heads=4, num_kv_heads=2, num_layers=2)
    model = str(write_hf_checkpoint(tmp_path / "tiny", config, random_state_dict(config)))
    opened: list[ttnn.MeshDevice] = []

    def open_and_record(topology: Mesh) -> ttnn.MeshDevice:
        opened.append(open_tt_device(topology))
        return opened[-1]

    monkeypatch.setattr("ttedge.runtime.tt.open_tt_device", open_and_record)
    # Per layer 2 norms and 5 split weights on 2 chips; the embedding, final norm and 2 LM head slices.
    tensors = (2 + 5 * 2) * config.num_layers + 2 + 2
    assert main(["convert", "--model", model, "--mesh", "n300"]) == 0
    assert f"for n300: {tensors} tensors converted" in capsys.readouterr().out
    [directory] = (tmp_path / "cache").glob("*/mesh1x2")
    assert len(list(directory.glob("layers.0.wqkv.device*.tensorbin"))) == 2

    command = ["generate", "--device", "tt", "--mesh", "n300", "--model", model, "--prompt", "hi"]
    caplog.set_level(logging.INFO, logger="ttedge.runtime.tt")
    assert main([*command, "--max-tokens", "3"]) == 0
    assert f"TT weights: 0 converted, {tensors} from {directory}" in caplog.text
    assert "3 tokens at" in capsys.readouterr().err
    [mesh] = opened
    assert mesh.get_num_devices() == 2


def test_kv_heads_repeat_on_the_chips_whose_query_heads_share_them() -> None:
    """2 KV heads on 8 chips: each chip gets one query head and the KV head of its group, the first KV
    head on chips 0-3 and the second on chips 4-7; the query heads and WO rows follow chip order."""
    plan = plan_tensor_parallel(SMALL, 8)
    assert (plan.kv_heads_per_device, plan.kv_head_copies) == (1, 4)
    tensors = random_weights(SMALL)
    whole = prepare_layer(SMALL, tensors, 0, plan.devices)
    shards = shard_layer(SMALL, whole, plan)
    head_dim, q_size, kv_size = SMALL.head_dim, SMALL.q_size, SMALL.kv_size
    for chip, wqkv in enumerate(shards["wqkv"]):
        kv_head = chip // 4
        q, k, v = np.split(wqkv, [head_dim, 2 * head_dim], axis=1)
        np.testing.assert_array_equal(q, whole.wqkv[:, chip * head_dim : (chip + 1) * head_dim])
        k_columns = slice(q_size + kv_head * head_dim, q_size + (kv_head + 1) * head_dim)
        np.testing.assert_array_equal(k, whole.wqkv[:, k_columns])
        v_columns = slice(q_size + kv_size + kv_head * head_dim, q_size + kv_size + (kv_head + 1) * head_dim)
        np.testing.assert_array_equal(v, whole.wqkv[:, v_columns])
        np.testing.assert_array_equal(shards["wo"][chip], whole.wo[chip * head_dim : (chip + 1) * head_dim])
    assert [len(shards[name]) for name in ("attn_norm", "mlp_norm")] == [1, 1]


def test_sharded_weights_are_cached_per_chip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Split weights go to one file per chip in the mesh's own cache directory, replicated ones to one
    file; a second conversion loads every one of them and gives each chip the same slice again."""
    # ttnn's block-float conversion asks the driver for the chips even on the host.
    monkeypatch.setenv("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK_DIR / "n300.yaml"))
    identity = model_identity(SMALL, [])
    first = WeightCache(tmp_path, identity, (1, 2))
    weights = random_weights(SMALL)
    converted = convert_model(SMALL, weights, SMOLLM2_PRESET, first, devices=2)
    assert first.directory.name == "mesh1x2"
    files = sorted(path.name.split("_dtype_")[0] for path in first.directory.glob("*.tensorbin"))
    split = ["wqkv", "wo", "w1", "w3", "w2"]
    per_layer = [f"layers.{i}.{name}" for i in range(SMALL.num_layers) for name in ("attn_norm", "mlp_norm")]
    per_chip = [
        f"layers.{i}.{name}.device{chip}"
        for i in range(SMALL.num_layers)
        for name in split
        for chip in (0, 1)
    ]
    outer = ["embed", "norm", "lm_head.device0", "lm_head.device1"]
    assert files == sorted(per_layer + per_chip + outer)

    second = WeightCache(tmp_path, identity, (1, 2))
    cached = convert_model(SMALL, {}, SMOLLM2_PRESET, second, devices=2)
    assert (second.converted, second.loaded) == (0, first.converted)
    for before, after in [
        (converted.layers[1].wqkv, cached.layers[1].wqkv),
        (converted.lm_head, cached.lm_head),
    ]:
        for chip_before, chip_after in zip(
            ttnn.get_device_tensors(before), ttnn.get_device_tensors(after), strict=True
        ):
            assert chip_before.shape == chip_after.shape
            np.testing.assert_array_equal(chip_before.to_numpy(), chip_after.to_numpy())
