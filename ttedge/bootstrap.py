"""Assemble a ready engine from settings: resolve and read the checkpoint, check it against its model
card, build the tokenizer, the runner (the model in the chosen CPU weight format, or the TT-NN port on a
Tenstorrent card) and the engine."""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ttedge import model_zoo
from ttedge.checkpoint import Checkpoint, load_checkpoint
from ttedge.checkpoint.discovery import resolve_model
from ttedge.collab.drafters import DRAFTERS
from ttedge.collab.speculative import SpeculativeConfig
from ttedge.config import ConfigError, EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import ModelRunner
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.tt_host import check_tt_device, choose_preset
from ttedge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedEngine:
    engine: Engine
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    card: model_zoo.ModelCard | None
    load_seconds: float


def check_card(checkpoint: Checkpoint) -> model_zoo.ModelCard | None:
    """The model card this checkpoint matches, if any; warns when a checkpoint named after a card
    contradicts it (a truncated conversion, a mislabelled file)."""
    config = checkpoint.config
    card = model_zoo.match_card(config)
    if card is not None:
        return card
    claimed = model_zoo.find_card(config.name) or model_zoo.find_card(checkpoint.path.stem)
    if claimed is not None:
        problems = model_zoo.check_against_card(
            config, claimed, scaling_in_tensors="rope.freq_factors" in checkpoint.tensors
        )
        log.warning("%s claims to be %s but differs from its card: %s", checkpoint.path, claimed.id, problems)
    return None


def build_runner(
    settings: EngineSettings, checkpoint: Checkpoint, card: model_zoo.ModelCard | None
) -> ModelRunner:
    kv_cache_bytes = settings.kv_cache_mb * 2**20
    if settings.device == "tt":
        # Imported here: the TT backend imports ttnn, which CPU-only installs do not have.
        from ttedge.runtime.tt import TtModelRunner, open_tt_device

        preset = choose_preset(card)
        mesh = open_tt_device()
        atexit.register(close_tt_device, mesh)
        return TtModelRunner.from_checkpoint(mesh, checkpoint, preset, kv_cache_bytes, settings.max_model_len)
    model = LlamaModel.from_checkpoint(checkpoint, settings.weight_format)
    return CpuModelRunner(model, kv_cache_bytes, settings.max_model_len)


def close_tt_device(mesh: object) -> None:
    import ttnn

    ttnn.close_device(mesh)


def speculative_config(settings: EngineSettings) -> SpeculativeConfig | None:
    if settings.speculative is None:
        return None
    drafter = DRAFTERS.get(settings.speculative)
    if drafter is None:
        known = ", ".join(DRAFTERS)
        message = f"unknown drafter {settings.speculative!r}; choose from {known}"
        raise ConfigError("speculative decoding", message)
    try:
        return SpeculativeConfig(drafter(), settings.num_draft_tokens)
    except ValueError as err:
        raise ConfigError("speculative decoding", str(err)) from None


def load_engine(settings: EngineSettings) -> LoadedEngine:
    started = time.perf_counter()
    if settings.device == "tt":
        check_tt_device()  # in a moment, before reading a checkpoint
    speculative = speculative_config(settings)  # likewise: a bad setting fails before the model loads
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    path: Path = resolve_model(settings.model)
    checkpoint = load_checkpoint(path)
    card = check_card(checkpoint)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    runner = build_runner(settings, checkpoint, card)
    engine = Engine(
        runner,
        lambda prompt_ids: tokenizer.detokenizer(prompt_ids=prompt_ids),
        eos_token_ids=tuple(tokenizer.eos_token_ids | set(checkpoint.config.eos_token_ids)),
        scheduler_config=SchedulerConfig(
            settings.max_num_seqs, settings.max_num_batched_tokens, policy=settings.scheduling
        ),
        max_queue_len=settings.max_queue_len,
        speculative=speculative,
    )
    return LoadedEngine(engine, tokenizer, checkpoint, card, time.perf_counter() - started)
