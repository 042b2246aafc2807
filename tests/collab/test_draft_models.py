"""``--draft`` and ``--strategy``: what each draft names, and one-line errors, before the model loads
where the settings alone show the mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_checkpoints import (
    random_state_dict,
    smollm2_gguf_path,
    tiny_config,
    write_hf_checkpoint,
)
from tests.models.conftest_helpers import full_sequence_logits
from ttedge.bootstrap import load_engine
from ttedge.checkpoint import load_checkpoint
from ttedge.collab.draft_models import DraftSpecError, build_drafter, parse_draft_spec
from ttedge.collab.drafters import PromptLookupDrafter
from ttedge.collab.model_drafter import ModelDrafter
from ttedge.config import ConfigError, EngineSettings
from ttedge.engine.sampling import SamplingParams
from ttedge.models.llama.reference import LlamaModel


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(num_layers=4)
    return write_hf_checkpoint(tmp_path_factory.mktemp("tiny"), config, random_state_dict(config, seed=1))


def test_specs_name_lookup_layers_or_a_checkpoint(tiny_checkpoint: Path):
    assert not parse_draft_spec("prompt-lookup").needs_model
    assert parse_draft_spec("self").shipped
    assert parse_draft_spec("self:0-2,7,9-10").layers == (0, 1, 2, 7, 9, 10)
    assert parse_draft_spec(str(tiny_checkpoint)).path == tiny_checkpoint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("self:", "is not a layer index"),
        ("self:3-1", "runs backwards"),
        ("self:2,1", "increasing order"),
        ("self:0-2,2", "increasing order"),
        ("/no/such/draft.gguf", "no such file exists"),
    ],
)
def test_bad_specs_are_refused(text: str, message: str):
    with pytest.raises(DraftSpecError, match=message):
        parse_draft_spec(text)


def test_self_draft_shares_the_big_models_weights(tiny_checkpoint: Path):
    checkpoint = load_checkpoint(tiny_checkpoint)
    target = LlamaModel.from_checkpoint(checkpoint)
    drafter = build_drafter(parse_draft_spec("self:0,3"), checkpoint, target, "float32", num_kv_blocks=8)
    assert isinstance(drafter, ModelDrafter)
    draft = drafter.runner.model  # type: ignore[attr-defined]
    assert draft.layers == [target.layers[0], target.layers[3]]
    assert drafter.runner.allocator.num_blocks == 8
    # Without the big model on CPU (a TT card runs it), the layers load from the checkpoint.
    loaded = build_drafter(parse_draft_spec("self:1"), checkpoint, None, "float32", num_kv_blocks=8)
    assert loaded.runner.model.config.num_layers == 1  # type: ignore[attr-defined]
    assert isinstance(
        build_drafter(parse_draft_spec("prompt-lookup"), checkpoint, target, "float32", 8),
        PromptLookupDrafter,
    )
    with pytest.raises(DraftSpecError, match="the model has layers 0-3"):
        build_drafter(parse_draft_spec("self:2-4"), checkpoint, target, "float32", 8)


def test_a_self_draft_of_a_model_that_runs_elsewhere_reads_only_its_layers(tiny_checkpoint: Path):
    """With the big model on a card or on other ranks, a self-draft reads its own layers and nothing else,
    and computes what the same layers shared with a CPU target compute."""
    checkpoint = load_checkpoint(tiny_checkpoint)
    shared = build_drafter(
        parse_draft_spec("self:1,3"), checkpoint, LlamaModel.from_checkpoint(checkpoint), "float32", 8
    )
    read: list[str] = []
    for name, source in checkpoint.tensors.items():
        source._loader = lambda load=source._loader, name=name: read.append(name) or load()  # type: ignore[misc]
    alone = build_drafter(parse_draft_spec("self:1,3"), checkpoint, None, "float32", 8)
    assert {name.split(".")[1] for name in read if name.startswith("layers.")} == {"1", "3"}
    tokens = [1, 17, 42, 99, 5]
    torch.testing.assert_close(
        full_sequence_logits(alone.runner, tokens),  # type: ignore[attr-defined]
        full_sequence_logits(shared.runner, tokens),  # type: ignore[attr-defined]
        rtol=0,
        atol=0,
    )


def test_a_model_without_a_shipped_self_draft_says_so(tiny_checkpoint: Path):
    checkpoint = load_checkpoint(tiny_checkpoint)
    with pytest.raises(DraftSpecError, match="no self-draft ships for this model"):
        build_drafter(parse_draft_spec("self"), checkpoint, None, "float32", 8)


@pytest.mark.slow
def test_the_shipped_self_draft_drafts_for_smollm2():
    loaded = load_engine(EngineSettings(model=str(smollm2_gguf_path()), draft="self", kv_cache_mb=16))
    engine = loaded.engine
    assert engine.collab is not None and engine.collab.small_model is not None
    assert engine.collab.small_model.runner.model.exit_adapter is not None  # type: ignore[attr-defined]
    prompt = loaded.tokenizer.encode("The capital of France is")
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))
    assert engine.stats().collab.draft_tokens > 0


def test_a_draft_with_another_vocabulary_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    other = tiny_config(vocab_size=300)
    path = write_hf_checkpoint(tmp_path, other, random_state_dict(other))
    with pytest.raises(DraftSpecError, match="must share the big model's tokenizer"):
        build_drafter(parse_draft_spec(str(path)), load_checkpoint(tiny_checkpoint), None, "float32", 8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "bild"}, "strategy 'bild' needs a drafter: give --draft"),
        ({"draft": "prompt-lookup", "strategy": "oracle"}, "unknown strategy 'oracle'; choose from plain, "),
        ({"draft": "prompt-lookup", "strategy": "guided"}, "strategy 'guided' needs a small model"),
        ({"draft": "self:0", "fallback_threshold": 1.5}, "fallback_threshold is a probability"),
        ({"draft": "self:0", "guided_tokens": 0}, "must be at least 1"),
        ({"draft": "self:0-9"}, "the model has layers 0-3"),
    ],
)
def test_engine_settings_errors_name_the_problem(tiny_checkpoint: Path, settings: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        load_engine(
            EngineSettings(model=str(tiny_checkpoint), weight_format="float32", kv_cache_mb=1, **settings)
        )


def test_cli_refuses_a_strategy_without_a_drafter_in_one_line(capsys: pytest.CaptureFixture[str]):
    from ttedge.cli import main

    assert main(["generate", "--prompt", "x", "--strategy", "routed"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ttedge: error: collaboration: strategy 'routed' needs a drafter: give --draft"
    )
