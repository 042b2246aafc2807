"""Hugging Face checkpoint directories: ``config.json`` + safetensors weights (single file or sharded).

Weights are memory-mapped through ``safetensors.safe_open`` and read one tensor at a time, on
``TensorSource.load()``; opening only reads headers. ``Checkpoint.metadata`` holds:

    "tokenizer_config"   contents of tokenizer_config.json ({} when absent); when the template
                         lives in chat_template.jinja (newer transformers), it is copied here
                         under "chat_template" so there is one place to look
    "generation_config"  contents of generation_config.json ({} when absent)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ttedge.checkpoint.base import (
    Checkpoint,
    CheckpointError,
    TensorNaming,
    TensorSource,
    canonical_shapes,
)
from ttedge.config import ConfigError, ModelConfig

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_NAMING = TensorNaming("model.layers.{i}.", _LAYER_NAMES, _GLOBAL_NAMES)
# Older transformers versions saved the rotary inverse frequencies as a buffer; they are
# derived from the config, so the file's copy carries no information.
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def canonical_name(hf_name: str) -> str | None:
    """The canonical name of a Hugging Face Llama tensor name, or ``None`` if it has none."""
    return _NAMING.canonical(hf_name)


def hf_name(canonical: str) -> str:
    """The Hugging Face name of a canonical tensor name."""
    return _NAMING.stored(canonical)


def open_hf_checkpoint(directory: Path, *, keep_dtype: bool = False) -> Checkpoint:
    """Open a Hugging Face Llama directory; every tensor's presence and shape is checked here."""
    config_file = directory / CONFIG_FILE
    hf_config = _read_json(config_file, required=True)
    try:
        config = ModelConfig.from_hf(hf_config, source=str(config_file), name=directory.name)
    except ConfigError as err:
        # ConfigError already starts with its source; CheckpointError adds the file itself.
        raise CheckpointError(config_file, str(err).removeprefix(f"{err.source}: ")) from None
    generation_config = _read_json(directory / GENERATION_CONFIG_FILE, required=False)
    config = _merge_generation_config(config, generation_config, directory / GENERATION_CONFIG_FILE)

    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise CheckpointError(tokenizer_file, "missing; a Hugging Face checkpoint needs its tokenizer.json")
    tokenizer_config = _read_json(directory / TOKENIZER_CONFIG_FILE, required=False)
    template_file = directory / CHAT_TEMPLATE_FILE
    if "chat_template" not in tokenizer_config and template_file.is_file():
        tokenizer_config["chat_template"] = template_file.read_text(encoding="utf-8")

    layout_file, tensor_files = _tensor_files(directory)
    tensors: dict[str, TensorSource] = {}
    stored_names: dict[str, str] = {}
    for shard, listed in tensor_files.items():
        handle = _open_shard(shard)
        stamp = _stamp(shard)
        keys = list(handle.keys())
        present = set(keys)
        for stored in keys if listed is None else listed:
            if stored not in present:
                raise CheckpointError(
                    shard, f"tensor listed in {INDEX_FILE} is not in this shard", tensor=stored
                )
            if _IGNORED_RE.fullmatch(stored):
                continue
            name = canonical_name(stored)
            if name is None:
                raise CheckpointError(shard, "unexpected tensor: not part of a Llama model", tensor=stored)
            view = handle.get_slice(stored)
            dtype = view.get_dtype()
            if dtype not in _TORCH_DTYPES:
                raise CheckpointError(
                    shard, f"unsupported dtype {dtype} (supported: {', '.join(_TORCH_DTYPES)})", tensor=stored
                )
            tensors[name] = TensorSource(
                name=name,
                shape=tuple(view.get_shape()),
                stored_dtype=dtype,
                file=str(shard),
                _loader=_loader(handle, stored, shard, stamp, keep_dtype),
            )
            stored_names[name] = stored

    if config.tie_word_embeddings:
        # Some exporters save the tied output layer anyway; Hugging Face ignores it and so do we.
        tensors.pop("lm_head.weight", None)
    _check_layout(config, tensors, stored_names, layout_file)
    return Checkpoint(
        path=directory,
        format="safetensors",
        config=config,
        tensors=tensors,
        tokenizer_path=directory,
        metadata={"tokenizer_config": tokenizer_config, "generation_config": generation_config},
    )


def _read_json(file: Path, *, required: bool) -> dict[str, Any]:
    if not file.is_file():
        if required:
            raise CheckpointError(file, "missing")
        return {}
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(file, f"unreadable JSON: {err}") from None
    if not isinstance(content, dict):
        raise CheckpointError(file, f"expected a JSON object, found {type(content).__name__}")
    return content


def _merge_generation_config(config: ModelConfig, generation: dict[str, Any], file: Path) -> ModelConfig:
    # Instruct models often list extra end-of-turn ids only in generation_config.json;
    # generation must stop on any of them.
    eos = generation.get("eos_token_id")
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    bos = generation.get("bos_token_id")
    try:
        eos_ids = tuple(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)]))
        bos_id = config.bos_token_id if config.bos_token_id is not None or bos is None else int(bos)
    except (TypeError, ValueError) as err:
        raise CheckpointError(file, f"malformed token id: {err}") from None
    return dataclasses.replace(config, eos_token_ids=eos_ids, bos_token_id=bos_id)


def _tensor_files(directory: Path) -> tuple[Path, Mapping[Path, list[str] | None]]:
    """The file that defines the tensor set (index or single file) and the tensors of each shard.

    ``None`` stands for "every tensor the file holds" (an unsharded checkpoint).
    """
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        index = _read_json(index_file, required=True)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(index_file, "no 'weight_map' object mapping tensor names to shard files")
        shards: dict[Path, list[str]] = {}
        for tensor, shard_name in weight_map.items():
            shards.setdefault(directory / shard_name, []).append(tensor)
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(shard, f"missing: shard named in {INDEX_FILE}")
        return index_file, shards
    single = directory / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(
            single, f"missing: a Hugging Face checkpoint needs {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}"
        )
    return single, {single: None}


def _open_shard(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            file, f"not a readable safetensors file (truncated or corrupted?): {err}"
        ) from None


def _stamp(file: Path) -> tuple[int, int]:
    stat = os.stat(file)
    return stat.st_size, stat.st_mtime_ns


def _loader(
    handle: Any, hf_name: str, file: Path, stamp: tuple[int, int], keep_dtype: bool
) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        # The shard is memory-mapped: reading pages of a file truncated since opening would kill
        # the process with SIGBUS instead of raising, so refuse to read a file that has changed.
        try:
            changed = _stamp(file) != stamp
        except OSError as err:
            raise CheckpointError(file, f"cannot read tensor data: {err}", tensor=hf_name) from None
        if changed:
            raise CheckpointError(file, "file changed on disk since it was opened; reopen it", tensor=hf_name)
        try:
            tensor = handle.get_tensor(hf_name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(file, f"cannot read tensor data: {err}", tensor=hf_name) from None
        if tensor.dtype != torch.float32 and not keep_dtype:
            return tensor.to(torch.float32)
        # The handle's mapping is private copy-on-write: a caller editing the tensor in place would
        # change what later loads of the same handle return.
        return tensor.clone()

    return load


def _check_layout(
    config: ModelConfig, tensors: dict[str, TensorSource], stored_names: dict[str, str], layout_file: Path
) -> None:
    expected = canonical_shapes(config)
    for name, source in tensors.items():
        want = expected.get(name)
        if want is None:
            raise CheckpointError(
                source.file,
                f"unexpected tensor: config.json declares {config.num_layers} layers",
                tensor=stored_names[name],
            )
        if source.shape != want:
            raise CheckpointError(
                source.file,
                f"shape {list(source.shape)} contradicts config.json, which implies {list(want)}",
                tensor=stored_names[name],
            )
    for name in expected:
        if name in tensors:
            continue
        if name == "lm_head.weight":
            raise CheckpointError(
                layout_file,
                "required tensor is missing: config.json has tie_word_embeddings=false, so the "
                "output layer must be stored (set tie_word_embeddings to true if it shares the embedding)",
                tensor="lm_head.weight",
            )
        raise CheckpointError(layout_file, "required tensor is missing", tensor=hf_name(name))
