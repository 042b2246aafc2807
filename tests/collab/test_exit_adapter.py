"""The self-speculative draft file: the shipped one fits SmolLM2-135M and runs, and every way a file can
be wrong is refused with a message naming the file and, where one is at fault, the tensor."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scripts.train_draft import save_draft
from tests.fixtures.tiny_checkpoints import smollm2_gguf_path
from tests.models.conftest_helpers import full_sequence_logits
from ttedge import model_zoo
from ttedge.checkpoint import CheckpointError, load_checkpoint
from ttedge.collab.draft_models import build_drafter, parse_draft_spec
from ttedge.collab.exit_adapter import (
    DOWN,
    GATE_UP,
    NORM,
    ExitAdapter,
    config_fingerprint,
    describe_layers,
    load_self_draft,
    residual_swiglu,
)
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner

SMOLLM2 = model_zoo.load_cards()["smollm2-135m-instruct"].config
RANK = 8


def random_adapter(hidden: int, rank: int = RANK, seed: int = 0) -> ExitAdapter:
    generator = torch.Generator().manual_seed(seed)
    return ExitAdapter(
        1 + 0.1 * torch.randn(hidden, generator=generator),
        torch.randn(2 * rank, hidden, generator=generator) / hidden**0.5,
        torch.randn(hidden, rank, generator=generator) / rank**0.5,
        1e-5,
    )


def write_draft(path: Path, layers: tuple[int, ...] = (0, 1, 2, 29)) -> Path:
    adapter = random_adapter(SMOLLM2.hidden_size)
    save_draft(path, adapter, layers, "smollm2-135m-instruct", config_fingerprint(SMOLLM2), {"note": "test"})
    return path


def test_adapter_is_a_residual_swiglu_of_the_normalised_input():
    adapter = random_adapter(16, rank=4)
    x = torch.randn(5, 16)
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + adapter.eps) * adapter.norm
    gate, up = (h @ adapter.gate_up.T).split(4, dim=-1)
    expected = x + (torch.nn.functional.silu(gate) * up) @ adapter.down.T
    torch.testing.assert_close(adapter(x), expected)
    # A zero output projection, as training starts, is the identity.
    identity = ExitAdapter(adapter.norm, adapter.gate_up, torch.zeros_like(adapter.down), adapter.eps)
    torch.testing.assert_close(identity(x), x)


def test_one_definition_serves_training_and_inference():
    adapter = random_adapter(16, rank=4)
    x = torch.randn(3, 16)
    parameters = [t.clone().requires_grad_() for t in (adapter.norm, adapter.gate_up, adapter.down)]
    trained = residual_swiglu(x, *parameters, adapter.eps)
    trained.sum().backward()
    assert all(p.grad is not None for p in parameters)
    out = adapter(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, trained.detach())


def test_file_round_trip(tmp_path: Path):
    path = write_draft(tmp_path / "draft.safetensors")
    draft = load_self_draft(path, SMOLLM2, dtype=torch.float32)
    assert draft.layer_indices == (0, 1, 2, 29)
    assert draft.adapter.rank == RANK
    torch.testing.assert_close(
        draft.adapter.down, random_adapter(SMOLLM2.hidden_size).down.bfloat16().float()
    )
    assert draft.metadata["target"] == "smollm2-135m-instruct"
    assert draft.metadata["note"] == "test"
    assert load_self_draft(path, SMOLLM2).adapter.dtype == torch.bfloat16


def test_the_shipped_draft_fits_smollm2():
    path = model_zoo.self_draft_path("smollm2-135m-instruct")
    assert path is not None and path.is_file()
    assert path.stat().st_size < 3 * 2**20
    draft = load_self_draft(path, SMOLLM2)
    assert draft.metadata["target"] == "smollm2-135m-instruct"
    assert len(draft.layer_indices) < SMOLLM2.num_layers
    # Trained: the adapter is no longer the identity it starts as.
    assert draft.adapter.down.abs().max() > 0
    assert model_zoo.self_draft_path("llama-3.1-8b-instruct") is None


@pytest.mark.slow
def test_the_shipped_draft_runs_on_the_real_model():
    checkpoint = load_checkpoint(smollm2_gguf_path())
    target = LlamaModel.from_checkpoint(checkpoint, "auto")
    path = model_zoo.self_draft_path("smollm2-135m-instruct")
    assert path is not None
    draft = load_self_draft(path, target.config, dtype=target.dtype)
    draft_model = draft.draft_model(target)
    assert draft_model.config.num_layers == len(draft.layer_indices)
    tokens = [1, 504, 3458, 282, 4649, 314, 2, 198, 504]
    logits = full_sequence_logits(CpuModelRunner(draft_model, 2**24), tokens)
    assert logits.shape == (len(tokens), target.config.vocab_size)
    assert torch.isfinite(logits).all()
    # The adapter changes what the kept layers alone would predict.
    plain = target.layer_subset(draft.layer_indices)
    assert not torch.equal(full_sequence_logits(CpuModelRunner(plain, 2**24), tokens), logits)
    # With the big model elsewhere (a card, other ranks), the same draft is built from its own layers alone.
    alone = build_drafter(parse_draft_spec("self"), checkpoint, None, "auto", num_kv_blocks=16)
    torch.testing.assert_close(full_sequence_logits(alone.runner, tokens), logits, rtol=0, atol=0)  # type: ignore[attr-defined]


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, **metadata: str) -> None:
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    save_file(
        load_file(path) if tensors is None else tensors, str(path), metadata=header["__metadata__"] | metadata
    )


def test_missing_file(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nowhere\.safetensors: no such draft file"):
        load_self_draft(tmp_path / "nowhere.safetensors", SMOLLM2)


def test_corrupt_file(tmp_path: Path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors: not a readable safetensors file"):
        load_self_draft(path, SMOLLM2)


def test_truncated_file(tmp_path: Path):
    path = write_draft(tmp_path / "truncated.safetensors")
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: not a readable safetensors file"):
        load_self_draft(path, SMOLLM2)


def test_draft_for_another_target(tmp_path: Path):
    path = write_draft(tmp_path / "draft.safetensors")
    other = dataclasses.replace(SMOLLM2, name="smollm2-360m-instruct", hidden_size=960, num_layers=32)
    with pytest.raises(
        CheckpointError,
        match=r"draft\.safetensors: trained for smollm2-135m-instruct \(hidden_size=576 vocab_size=49152 "
        r"num_layers=30\), but the target is smollm2-360m-instruct \(hidden_size=960",
    ):
        load_self_draft(path, other)


def test_not_a_draft_file(tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    save_file({NORM: torch.ones(576)}, str(path))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors: metadata has no 'format'"):
        load_self_draft(path, SMOLLM2)


@pytest.mark.parametrize(
    ("tensor", "shape", "message"),
    [
        (GATE_UP, (2 * RANK, 512), r"shape \[16, 512\], expected \[16, 576\]"),
        (DOWN, (576, RANK + 1), r"shape \[576, 9\], expected \[576, 8\]"),
        (NORM, (577,), r"shape \[577\], expected \[576\]"),
    ],
)
def test_wrong_shape_names_the_tensor(tmp_path: Path, tensor: str, shape: tuple[int, ...], message: str):
    path = write_draft(tmp_path / "draft.safetensors")
    tensors = load_file(path) | {tensor: torch.zeros(shape, dtype=torch.bfloat16)}
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=rf"draft\.safetensors \[tensor {tensor}\]: {message}"):
        load_self_draft(path, SMOLLM2)


@pytest.mark.parametrize("tensor", [NORM, GATE_UP, DOWN])
def test_missing_tensor_is_named(tmp_path: Path, tensor: str):
    path = write_draft(tmp_path / "draft.safetensors")
    tensors = {name: t for name, t in load_file(path).items() if name != tensor}
    rewrite(path, tensors)
    with pytest.raises(CheckpointError, match=rf"\[tensor {tensor}\]: missing from the draft file"):
        load_self_draft(path, SMOLLM2)


def test_unknown_tensor_is_named(tmp_path: Path):
    path = write_draft(tmp_path / "draft.safetensors")
    rewrite(path, load_file(path) | {"exit_adapter.extra": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"\[tensor exit_adapter.extra\]: not a tensor of"):
        load_self_draft(path, SMOLLM2)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ("[0, 1, 30]", r"layer_indices \[0, 1, 30\] out of range: the target has layers 0 to 29"),
        ("[-1, 3]", r"layer_indices \[-1, 3\] out of range"),
        ("[3, 2]", r"layer_indices must be increasing and distinct, got \[3, 2\]"),
        ("[]", r"layer_indices must be a JSON list of integers, got '\[\]'"),
        ("0-5", r"layer_indices must be a JSON list of integers, got '0-5'"),
    ],
)
def test_bad_layer_indices(tmp_path: Path, indices: str, message: str):
    path = write_draft(tmp_path / "draft.safetensors")
    rewrite(path, layer_indices=indices)
    with pytest.raises(CheckpointError, match=rf"draft\.safetensors: {message}"):
        load_self_draft(path, SMOLLM2)


def test_describe_layers():
    assert describe_layers([0, 1, 2, 3, 4, 5]) == "0-5"
    assert describe_layers([0, 1, 2, 29]) == "0-2,29"
    assert describe_layers([0, 6, 12]) == "0,6,12"
