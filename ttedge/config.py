"""Llama-family model hyper-parameters, parsed from Hugging Face ``config.json`` or GGUF metadata.

One ``ModelConfig`` describes every model ttedge runs, whatever the checkpoint format, so the
reference model, the TT port and the planner read the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama",)
# Hugging Face architecture names that share the Llama block structure ttedge implements.
_HF_LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


class ConfigError(ValueError):
    """A configuration that ttedge cannot run (a model's, or the engine's), with the source it came from."""

    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")
        self.source = source


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling; ``kind`` is ``linear`` or ``llama3``."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "llama"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
        )
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def validate(self, source: str) -> ModelConfig:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(source, f"unsupported architecture {self.architecture!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(source, f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                source,
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})",
            )
        if self.head_dim % 2:
            raise ConfigError(source, f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(source, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(source, f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None and self.rope_scaling.kind not in ("linear", "llama3"):
            raise ConfigError(source, f"unsupported rope scaling {self.rope_scaling.kind!r}")
        return self

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str, name: str = "") -> ModelConfig:
        """Parse a Hugging Face ``config.json`` dictionary."""
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or []
        if model_type != "llama" and not any(a in _HF_LLAMA_ARCHITECTURES for a in architectures):
            raise ConfigError(
                source,
                f"unsupported architecture (model_type={model_type!r}, architectures={architectures}); "
                "ttedge runs Llama-family models",
            )
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            eos = hf.get("eos_token_id")
            # transformers >= 5 saves rope_theta and the scaling together as "rope_parameters".
            rope = hf.get("rope_parameters") or {}
            config = cls(
                name=name or str(hf.get("_name_or_path", "")),
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_scaling=_rope_scaling_from_hf(hf.get("rope_scaling") or rope, source),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            )
        except KeyError as missing:
            raise ConfigError(source, f"missing required key {missing.args[0]!r}") from None
        except (TypeError, ValueError) as bad:
            raise ConfigError(source, f"malformed value: {bad}") from None
        return config.validate(source)

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], source: str) -> ModelConfig:
        """Parse GGUF key/value metadata (already decoded to Python values)."""
        arch = metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(source, f"unsupported architecture {arch!r}; ttedge runs Llama-family models")

        def key(suffix: str, default: Any = None, required: bool = True) -> Any:
            full = f"{arch}.{suffix}"
            if full not in metadata:
                if required:
                    raise ConfigError(source, f"missing required metadata key {full!r}")
                return default
            return metadata[full]

        try:
            hidden = int(key("embedding_length"))
            num_heads = int(key("attention.head_count"))
            vocab = key("vocab_size", required=False)
            if vocab is None:
                tokens = metadata.get("tokenizer.ggml.tokens")
                if tokens is None:
                    raise ConfigError(source, "neither llama.vocab_size nor tokenizer.ggml.tokens is present")
                vocab = len(tokens)
            head_dim = int(key("attention.key_length", required=False) or hidden // num_heads)
            scaling = None
            scaling_type = key("rope.scaling.type", required=False)
            if scaling_type != "none" and (
                scaling_type in ("linear", "llama3") or key("rope.scaling.factor", required=False)
            ):
                scaling = RopeScaling(
                    kind=str(scaling_type or "linear"),
                    factor=float(key("rope.scaling.factor")),
                    original_max_position_embeddings=int(
                        key("rope.scaling.original_context_length", default=8192, required=False)
                    ),
                )
            eos = metadata.get("tokenizer.ggml.eos_token_id")
            bos = metadata.get("tokenizer.ggml.bos_token_id")
            config = cls(
                name=str(metadata.get("general.name", "")),
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(key("feed_forward_length")),
                num_layers=int(key("block_count")),
                num_heads=num_heads,
                num_kv_heads=int(key("attention.head_count_kv", default=num_heads, required=False)),
                head_dim=head_dim,
                rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", default=1e-5, required=False)),
                rope_theta=float(key("rope.freq_base", default=10000.0, required=False)),
                max_position_embeddings=int(key("context_length", default=2048, required=False)),
                # Filled in by the loader: GGUF says "tied" only by leaving out output.weight.
                tie_word_embeddings=False,
                rope_scaling=scaling,
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=() if eos is None else (int(eos),),
            )
        except (TypeError, ValueError) as bad:
            raise ConfigError(source, f"malformed metadata value: {bad}") from None
        return config.validate(source)


def _rope_scaling_from_hf(raw: dict[str, Any] | None, source: str) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(source, f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return RopeScaling(
        kind=kind,
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )


# Backends a model runs on: the torch reference on the host, or the TT-NN port on a Tenstorrent card.
DEVICES = ("cpu", "tt")


@dataclass(frozen=True)
class EngineSettings:
    """How to assemble an engine: which model, on which device, in which CPU weight format, with how much KV
    memory."""

    model: str | None = None  # a path or a model-card name; None = the embedded default
    device: str = "cpu"  # one of DEVICES
    # With device "tt": the chips the model is split over, an ethernet_mesh built-in (n150, n300, t3k) or a
    # mesh YAML file; n150 is one chip.
    mesh: str = "n150"
    # int4 for small batches, bfloat16 above: 1.9x int4's aggregate at 32 sequences (docs/benchmarks.md).
    weight_format: str = "auto"
    kv_cache_mb: int = 256  # host memory on cpu, device DRAM on tt
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    threads: int | None = None  # torch intra-op threads; None = all cores
    max_queue_len: int | None = None  # requests that may wait beyond a full batch; None = no limit
    scheduling: str = "fcfs"  # scheduling policy: fcfs | length-aware (docs/scheduling.md)
    # Outputs that do not depend on the batch (int4/int8 weights, attention token by token): slower,
    # and greedy speculative output then equals plain greedy output on the real model.
    batch_invariant: bool = False
    # Big–little collaboration (docs/speculative.md): the drafter or small model (`--draft`), and the
    # default strategy; None = speculative with a draft, plain without.
    draft: str | None = None
    strategy: str | None = None
    num_draft_tokens: int = 4
    fallback_threshold: float = 0.5
    rollback_threshold: float = 2.0
    guided_tokens: int = 8
    route_threshold: float = 0.6


@dataclass(frozen=True)
class ServerSettings:
    """How to serve the OpenAI-compatible API (``ttedge serve``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None = no authentication
    max_body_bytes: int = 1 << 20
    # How long SIGTERM waits for requests in flight before the server stops anyway.
    drain_timeout: float = 30.0
