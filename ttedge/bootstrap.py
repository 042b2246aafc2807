"""Assemble a ready engine from settings: resolve and read the checkpoint, check it against its model
card, build the tokenizer, the model in the chosen CPU weight format, the runner and the engine."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ttedge import model_zoo
from ttedge.checkpoint import Checkpoint, load_checkpoint
from ttedge.checkpoint.discovery import resolve_model
from ttedge.config import EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner
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


def load_engine(settings: EngineSettings) -> LoadedEngine:
    started = time.perf_counter()
    torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    path: Path = resolve_model(settings.model)
    checkpoint = load_checkpoint(path)
    card = check_card(checkpoint)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    model = LlamaModel.from_checkpoint(checkpoint, settings.weight_format)
    runner = CpuModelRunner(model, settings.kv_cache_mb * 2**20, settings.max_model_len)
    engine = Engine(
        runner,
        lambda prompt_ids: tokenizer.detokenizer(prompt_ids=prompt_ids),
        eos_token_ids=tuple(tokenizer.eos_token_ids | set(checkpoint.config.eos_token_ids)),
        scheduler_config=SchedulerConfig(
            settings.max_num_seqs, settings.max_num_batched_tokens, policy=settings.scheduling
        ),
        max_queue_len=settings.max_queue_len,
    )
    return LoadedEngine(engine, tokenizer, checkpoint, card, time.perf_counter() - started)
