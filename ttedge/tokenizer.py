"""Text to token ids and back, chat templates, and streaming detokenisation.

One :class:`Tokenizer` type over the Hugging Face ``tokenizers`` library (Rust), built from either

* a directory with ``tokenizer.json`` (plus ``tokenizer_config.json``, ``chat_template.jinja`` and
  ``generation_config.json`` when present), or
* the vocabulary a GGUF file carries in its metadata, rebuilt the way llama.cpp reads it:
  ``tokenizer.ggml.model == "gpt2"`` is byte-level BPE split by the regexes ``tokenizer.ggml.pre`` names,
  ``"llama"`` is a SentencePiece BPE vocabulary (scores, ``▁`` for spaces, ``<0xNN>`` byte fallback).

Decoding is lossless: ``clean_up_tokenization_spaces`` is never applied, so streamed pieces always add
up to the full decode.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

if TYPE_CHECKING:
    from ttedge.checkpoint.base import Checkpoint

__all__ = ["IncrementalDetokenizer", "Tokenizer", "TokenizerError"]


class TokenizerError(Exception):
    """A tokenizer that cannot be built or a request it cannot serve; names the file or key at fault."""


# llama.cpp's token types (gguf.TokenType); UNUSED (5) pieces stay in the vocabulary but never merge.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Pre-tokenizer regexes per ``tokenizer.ggml.pre``, as in llama.cpp's llm_tokenizer_bpe: each regex in turn
# splits every piece further, keeping matches and the text between them as separate pieces. llama.cpp spells
# some regexes differently because its engine lacks inline flags; these are the tokenizer.json originals.
_LLAMA3_PRES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")
_BPE_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    # The fallback llama.cpp uses for "default" and for files without the key.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    # StarCoder-style vocabularies (SmolLM among them) were trained on single digits.
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        (r"\p{N}", _GPT2_SPLIT),
    ),
    **dict.fromkeys((*_LLAMA3_PRES, "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), (_QWEN2_SPLIT,)),
}

# Tokens that end a turn in the chat formats we know, matched by text as llama.cpp does, since files rarely
# list them all (SmolLM2's GGUF names only <|im_end|>; Llama 3 instruct also stops on <|eot_id|>, <|eom_id|>).
_END_OF_TURN_TOKENS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    }
)


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Build one with :meth:`from_gguf_metadata`, :meth:`from_directory` or :meth:`from_checkpoint`.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: frozenset[int],
        add_bos: bool,
        chat_template: str | None,
        source: str,
    ):
        self._backend = backend
        self._literal_backend: Backend | None = None
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        # The declared EOS (what templates call eos_token); eos_token_ids adds every end-of-turn token.
        self.eos_token_id = eos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.source = source
        self._compiled_template: jinja2.Template | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Tokenizer:
        """The tokenizer a checkpoint carries: its GGUF metadata, or its ``tokenizer.json`` directory."""
        if ckpt.format == "gguf":
            return cls.from_gguf_metadata(ckpt.metadata, source=str(ckpt.tokenizer_path))
        config = ckpt.metadata.get("tokenizer_config")
        return cls.from_directory(
            ckpt.tokenizer_path, tokenizer_config=config if isinstance(config, Mapping) else None
        )

    @classmethod
    def from_directory(
        cls, path: str | Path, *, tokenizer_config: Mapping[str, Any] | None = None
    ) -> Tokenizer:
        """A Hugging Face tokenizer directory: ``tokenizer.json`` and, if given or present, its config files.

        ``tokenizer_config`` stands in for ``tokenizer_config.json`` (checkpoint readers pass what they read).
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(
                f"{file}: not found; ttedge reads fast tokenizers only "
                "(convert with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        try:
            backend = Backend.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"{file}: cannot be read: {exc}") from exc
        config = (
            dict(tokenizer_config)
            if tokenizer_config is not None
            else _read_json(path / "tokenizer_config.json")
        )

        def token_id(key: str) -> int | None:
            content = config.get(key)
            if isinstance(content, dict):  # older configs store AddedToken dicts
                content = content.get("content")
            if not isinstance(content, str):
                return None
            found = backend.token_to_id(content)
            if found is None:
                raise TokenizerError(f"{path / 'tokenizer_config.json'}: {key} {content!r} is not in {file}")
            return found

        bos, eos = token_id("bos_token"), token_id("eos_token")
        eos_ids = {eos} if eos is not None else set()
        # Llama 3 lists its end-of-turn ids only here.
        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        if isinstance(generation_eos, int):
            eos_ids.add(generation_eos)
        elif isinstance(generation_eos, list):
            eos_ids.update(i for i in generation_eos if isinstance(i, int))
        special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        eos_ids.update(i for text, i in special.items() if text in _END_OF_TURN_TOKENS)

        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            # No flag: the post-processor decides, as it does for Llama 3's tokenizer.json.
            add_bos = bos is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos]

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")

        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=frozenset(eos_ids),
            add_bos=add_bos,
            chat_template=template if isinstance(template, str) else None,
            source=str(path),
        )

    @classmethod
    def from_gguf_metadata(
        cls, metadata: Mapping[str, object], *, source: str = "GGUF metadata"
    ) -> Tokenizer:
        """The vocabulary in GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template`` keys).

        ``source`` names the file in error messages.
        """
        meta = _Metadata(metadata, source)
        kind = meta.string("tokenizer.ggml.model")
        tokens = meta.strings("tokenizer.ggml.tokens")
        types = meta.ints("tokenizer.ggml.token_type", default=[_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        bos = meta.optional_int("tokenizer.ggml.bos_token_id")
        eos = meta.optional_int("tokenizer.ggml.eos_token_id")
        unk = meta.optional_int("tokenizer.ggml.unknown_token_id")
        for key, index in (("bos", bos), ("eos", eos), ("unknown", unk)):
            if index is not None and not 0 <= index < len(tokens):
                raise TokenizerError(
                    f"{source}: tokenizer.ggml.{key}_token_id {index} is outside the vocabulary"
                )
        if unk is None:
            unk = next((i for i, kind in enumerate(types) if kind == _UNKNOWN), None)

        if kind == "gpt2":
            pre = meta.optional_string("tokenizer.ggml.pre") or "default"
            if pre not in _BPE_PRE_SPLITS:
                raise TokenizerError(
                    f"{source}: tokenizer.ggml.pre {pre!r} names a pre-tokenizer ttedge does not know; "
                    f"known: {', '.join(sorted(_BPE_PRE_SPLITS))}"
                )
            backend = _byte_level_bpe(tokens, meta.strings("tokenizer.ggml.merges"), pre)
            default_add_bos = pre in _LLAMA3_PRES
        elif kind == "llama":
            add_space_prefix = meta.optional_bool("tokenizer.ggml.add_space_prefix")
            backend = _sentencepiece_bpe(
                tokens,
                meta.floats("tokenizer.ggml.scores"),
                types,
                unk_token=None if unk is None else tokens[unk],
                add_space_prefix=True if add_space_prefix is None else add_space_prefix,
            )
            default_add_bos = True
        else:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.model {kind!r} is not supported; ttedge reads 'gpt2' "
                "(byte-level BPE) and 'llama' (SentencePiece BPE)"
            )

        eos_ids = {
            i
            for i in (
                eos,
                meta.optional_int("tokenizer.ggml.eot_token_id"),
                meta.optional_int("tokenizer.ggml.eom_token_id"),
            )
            if i is not None
        }
        eos_ids.update(i for i, t in enumerate(tokens) if t in _END_OF_TURN_TOKENS)
        # llama.cpp matches control, user-defined and unknown tokens whole in text, before any splitting. The
        # BOS and end tokens count as control even where a file mislabels them, as llama.cpp also overrides.
        control = {i for i in (bos, unk) if i is not None} | eos_ids
        backend.add_special_tokens(
            [
                AddedToken(token, special=True, normalized=False)
                for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
                if kind in (_CONTROL, _UNKNOWN) or i in control
            ]
        )
        backend.add_tokens(
            [
                AddedToken(token, special=False, normalized=False)
                for token, kind in zip(tokens, types, strict=True)
                if kind == _USER_DEFINED
            ]
        )
        add_bos = meta.optional_bool("tokenizer.ggml.add_bos_token")
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=frozenset(eos_ids),
            add_bos=(default_add_bos if add_bos is None else add_bos) and bos is not None,
            chat_template=meta.optional_string("tokenizer.chat_template"),
            source=source,
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_bos``: prepend the BOS token; ``None`` does what the model expects. Text rendered by
        :meth:`apply_chat_template` already holds whatever BOS the template wants: encode it with ``False``.
        ``parse_special``: match special tokens such as ``<|im_start|>`` written in the text as single ids;
        when ``False`` they are encoded as the plain text they spell.
        """
        if parse_special:
            backend = self._backend
        else:
            if self._literal_backend is None:
                literal = Backend.from_str(self._backend.to_str())
                literal.encode_special_tokens = True
                self._literal_backend = literal
            backend = self._literal_backend
        ids: list[int] = backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise TokenizerError(f"{self.source}: the model has no BOS token to add")
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens (BOS, ``<|im_end|>``, ...) are dropped when asked."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary's spelling of ``token_id`` (``Ġworld``, ``▁the``, ``<0x0A>``, ``<|im_end|>``)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return token

    def detokenizer(
        self, *, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming decoder for one sequence; see :class:`IncrementalDetokenizer`."""
        return IncrementalDetokenizer(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids of ``messages`` rendered by the chat template, ready for the assistant's turn (the
        template writes any BOS itself)."""
        return self.encode(self.apply_chat_template(messages), add_bos=False)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the model's chat template.

        Rendered as transformers does: a sandboxed jinja2 environment with ``trim_blocks``/``lstrip_blocks``,
        ``raise_exception``, ``strftime_now``, ``bos_token`` and ``eos_token``; keys whose value is ``None``
        are dropped from messages (OpenAI clients send ``content: null``).
        """
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.source}: the model has no chat template (tokenizer.chat_template in GGUF, "
                "chat_template in tokenizer_config.json, or chat_template.jinja); encode a plain prompt"
            )
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if self._compiled_template is None:
            try:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as exc:
                raise TokenizerError(f"{self.source}: the chat template does not parse: {exc}") from exc
        special = {
            name: self.id_to_token(token_id)
            for name, token_id in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))
            if token_id is not None
        }
        return self._compiled_template.render(
            messages=[{k: v for k, v in m.items() if v is not None} for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **special,
        )


class IncrementalDetokenizer:
    """Decodes a sequence one token at a time, returning only the new text at each step.

    Each step decodes a short window of trailing ids (the text already emitted for its first part is
    subtracted), as vLLM's ``detokenize_incrementally`` does, so the cost per token does not grow with
    the sequence. Text ending in an incomplete UTF-8 character is held back until the character is
    complete; :meth:`finish` releases whatever is still held. With no prompt, the pieces concatenate to
    ``tokenizer.decode(ids)``. Given ``prompt_ids``, the last few seed the window, so that the first new
    token keeps the leading space a standalone decode of it would strip (SentencePiece vocabularies).
    """

    _PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, *, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self._decode: Callable[[Sequence[int]], str] = lambda ids: tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens
        )
        # _window holds the ids still needed: the emitted context [:_read] and the undecided tail [_read:].
        self._window = list(prompt_ids[-self._PROMPT_CONTEXT :])
        self._read = len(self._window)
        self._context_text = self._decode(self._window)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (often ``""`` inside a multi-byte character)."""
        self._window.append(token_id)
        text = self._decode(self._window)
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return ""
        new_text = text[len(self._context_text) :]
        # The ids just emitted become the context of the next window.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        return new_text

    def finish(self) -> str:
        """End of the sequence: the held-back text, with U+FFFD for bytes that never formed a character."""
        text = self._decode(self._window)
        held = text[len(self._context_text) :] if len(text) > len(self._context_text) else ""
        self._read, self._context_text = len(self._window), text
        return held


# ---------------------------------------------------------------------- GGUF vocabularies


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> Backend:
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        pairs.append((left, right))
    backend = Backend(
        models.BPE(
            vocab,
            pairs,
            # llama.cpp takes a pre-token that is itself in the vocabulary whole for Llama 3, as its
            # tokenizer.json asks ("ignore_merges": true).
            ignore_merges=pre in _LLAMA3_PRES,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _BPE_PRE_SPLITS[pre]),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(
    tokens: list[str], scores: list[float], types: list[int], *, unk_token: str | None, add_space_prefix: bool
) -> Backend:
    """SentencePiece BPE: merge the adjacent pair whose union is the best-scoring vocabulary piece.

    ``tokenizers`` BPE wants ranked merges, so every split of a normal piece into two normal pieces becomes
    a merge ranked by the piece's score. Only equal scores can order differently from SentencePiece (which
    then takes the leftmost pair); trained models give every piece its own score.
    """
    if len(scores) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {token: index for index, token in enumerate(tokens)}
    normal = {token for token, kind in zip(tokens, types, strict=True) if kind == _NORMAL}
    ranked: list[tuple[float, int, str, str]] = []
    for index, (piece, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], index, left, right))
    ranked.sort()
    backend = Backend(
        models.BPE(
            vocab,
            [(left, right) for _, _, left, right in ranked],
            unk_token=unk_token,
            fuse_unk=True,
            byte_fallback=any(kind == _BYTE for kind in types),
        )
    )
    # A normalizer, not Metaspace: it prefixes every stretch between special tokens, as llama.cpp does,
    # and also text that starts with a space (Metaspace would not add a second "▁" there; SentencePiece does).
    escape = normalizers.Replace(" ", "▁")
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend("▁"), escape]) if add_space_prefix else escape
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


class _Metadata:
    """Typed reads of GGUF key/values, with errors that name the file and the key."""

    def __init__(self, metadata: Mapping[str, object], source: str):
        self._metadata = metadata
        self._source = source

    def _get(self, key: str) -> object:
        if key not in self._metadata:
            raise TokenizerError(f"{self._source}: metadata key {key} is missing")
        return self._metadata[key]

    def _list(self, key: str, kind: type) -> list[Any]:
        value = self._get(key)
        try:
            if isinstance(value, str) or not isinstance(value, Iterable):
                raise TypeError(key)
            return [kind(item) for item in value]
        except (TypeError, ValueError) as exc:
            raise TokenizerError(
                f"{self._source}: metadata key {key} is not a list of {kind.__name__}"
            ) from exc

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise TokenizerError(f"{self._source}: metadata key {key} is not a string")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if key in self._metadata else None

    def strings(self, key: str) -> list[str]:
        value = self._get(key)
        if (
            isinstance(value, str)
            or not isinstance(value, Sequence)
            or not all(isinstance(i, str) for i in value)
        ):
            raise TokenizerError(f"{self._source}: metadata key {key} is not a list of strings")
        return list(value)

    def ints(self, key: str, *, default: list[int]) -> list[int]:
        return self._list(key, int) if key in self._metadata else default

    def floats(self, key: str) -> list[float]:
        return self._list(key, float)

    def optional_int(self, key: str) -> int | None:
        if key not in self._metadata:
            return None
        value = self._metadata[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenizerError(f"{self._source}: metadata key {key} is not an integer")
        return value

    def optional_bool(self, key: str) -> bool | None:
        if key not in self._metadata:
            return None
        value = self._metadata[key]
        if not isinstance(value, bool):
            raise TokenizerError(f"{self._source}: metadata key {key} is not a boolean")
        return value


# ---------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot be read: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    # Chat templates come from model repositories: untrusted code, hence the sandbox. The rest mirrors what
    # transformers offers templates, since that is what they are written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
