"""Assemble a ready engine from settings: resolve and read the checkpoint, check it against its model
card, build the tokenizer, the runner (the model in the chosen CPU weight format, or the TT-NN port on a
Tenstorrent card) and the engine."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ttedge import model_zoo
from ttedge.checkpoint import Checkpoint, load_checkpoint
from ttedge.checkpoint.discovery import resolve_model
from ttedge.collab.draft_models import DraftSpec, build_drafter, parse_draft_spec
from ttedge.collab.drafters import PromptLookupDrafter
from ttedge.collab.strategies import CollabConfig, Strategy
from ttedge.config import ConfigError, EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.scheduler import SchedulerConfig
from ttedge.ethernet_mesh.sharding import ShardingError
from ttedge.models.llama.linear import WeightFormat
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.base import ModelRunner
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.tensor_parallel import Rendezvous, driver_runner, join_group, load_shard, run_worker
from ttedge.runtime.tt_host import DEFAULT_MESH, check_tt_device, choose_preset, mesh_plan, resolve_mesh
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
    settings: EngineSettings,
    checkpoint: Checkpoint,
    card: model_zoo.ModelCard | None,
    rendezvous: Rendezvous | None = None,
) -> ModelRunner:
    if rendezvous is not None:
        runner = driver_runner(rank_runner(settings, checkpoint, card, rendezvous), checkpoint.config)
        # Also when rank 0 fails after loading: the other ranks then leave their loop instead of waiting.
        atexit.register(runner.close)
        return runner
    if settings.device == "tt":
        return tt_runner(settings, checkpoint, card)
    model = LlamaModel.from_checkpoint(
        checkpoint, settings.weight_format, batch_invariant=settings.batch_invariant
    )
    return CpuModelRunner(model, settings.kv_cache_mb * 2**20, settings.max_model_len)


def tt_runner(
    settings: EngineSettings, checkpoint: Checkpoint, card: model_zoo.ModelCard | None
) -> ModelRunner:
    # Imported here: the TT backend imports ttnn, which CPU-only installs do not have.
    from ttedge.runtime.tt import TtModelRunner, close_tt_device, open_tt_device

    preset = choose_preset(card)
    topology = resolve_mesh(settings.mesh)
    mesh = open_tt_device(topology)
    atexit.register(close_tt_device, mesh)
    return TtModelRunner.from_checkpoint(
        mesh, checkpoint, preset, settings.kv_cache_mb * 2**20, settings.max_model_len, ring=topology.is_ring
    )


def rank_runner(
    settings: EngineSettings, checkpoint: Checkpoint, card: model_zoo.ModelCard | None, rendezvous: Rendezvous
) -> ModelRunner:
    """This rank's runner in a group (runtime/tensor_parallel.py). On CPU, its shard of the model. On TT,
    the group is the hosts of one mesh (started by tt-run): every rank drives the whole mesh's runner, so
    that each host issues the same ops to its own chips. Every rank gets the same ``settings``, so every
    rank's KV cache has the same number of blocks."""
    if settings.device == "tt":
        join_group(rendezvous)
        return tt_runner(settings, checkpoint, card)
    try:
        model = load_shard(checkpoint, rendezvous, settings.weight_format, settings.batch_invariant)
    except ShardingError as err:
        raise ConfigError("tensor parallelism", str(err)) from None
    return CpuModelRunner(model, settings.kv_cache_mb * 2**20, settings.max_model_len)


def run_shard(settings: EngineSettings, rendezvous: Rendezvous) -> None:
    """A rank other than 0: load its part, then make the calls rank 0 sends until it stops."""
    torch.set_num_threads(settings.threads or rendezvous.threads())
    checkpoint = load_checkpoint(resolve_model(settings.model))
    run_worker(rank_runner(settings, checkpoint, check_card(checkpoint), rendezvous))


@dataclass(frozen=True)
class CollabPlan:
    """What the settings ask of big–little collaboration, checked before any model loads."""

    draft: DraftSpec
    # Every number checked; its drafter is prompt lookup until ``build_collab`` builds the real one.
    config: CollabConfig
    strategy: Strategy


def collab_plan(settings: EngineSettings) -> CollabPlan | None:
    known = [s.value for s in Strategy]
    if settings.strategy and settings.strategy not in known:
        raise ConfigError(
            "collaboration", f"unknown strategy {settings.strategy!r}; choose from {', '.join(known)}"
        )
    strategy = Strategy(settings.strategy) if settings.strategy else None
    if settings.draft is None:
        if strategy not in (None, Strategy.PLAIN):
            raise ConfigError(
                "collaboration", f"strategy {settings.strategy!r} needs a drafter: give --draft"
            )
        return None
    try:
        spec = parse_draft_spec(settings.draft)
        strategy = strategy or Strategy.SPECULATIVE
        if strategy.needs_small_model and not spec.needs_model:
            raise ValueError(f"strategy {strategy.value!r} needs a small model, not {spec.text!r}")
        config = CollabConfig(
            PromptLookupDrafter(),
            default_strategy=Strategy.PLAIN,
            num_draft_tokens=settings.num_draft_tokens,
            fallback_threshold=settings.fallback_threshold,
            rollback_threshold=settings.rollback_threshold,
            guided_tokens=settings.guided_tokens,
            route_threshold=settings.route_threshold,
        )
    except ValueError as err:
        raise ConfigError("collaboration", str(err)) from None
    return CollabPlan(spec, config, strategy)


def build_collab(
    plan: CollabPlan, settings: EngineSettings, checkpoint: Checkpoint, runner: ModelRunner
) -> CollabConfig:
    target_model = runner.model if isinstance(runner, CpuModelRunner) else None
    try:
        drafter = build_drafter(
            plan.draft, checkpoint, target_model, settings.weight_format, runner.allocator.num_blocks
        )
    except ValueError as err:
        raise ConfigError("collaboration", str(err)) from None
    return dataclasses.replace(plan.config, drafter=drafter, default_strategy=plan.strategy)


def load_engine(settings: EngineSettings, rendezvous: Rendezvous | None = None) -> LoadedEngine:
    """``rendezvous``: this process is rank 0 of a group (``ttedge launch``: CPU shards, or the hosts of
    one TT mesh); ``run_shard`` runs the others."""
    started = time.perf_counter()
    if settings.device == "tt":
        check_tt_device()  # in a moment, before reading a checkpoint
        resolve_mesh(settings.mesh)
    elif settings.mesh != DEFAULT_MESH:
        raise ConfigError("--mesh", "splits a model over Tenstorrent chips: it needs --device tt")
    collab = collab_plan(settings)  # likewise: a bad setting fails before the model loads
    if settings.batch_invariant and not WeightFormat(settings.weight_format).row_independent:
        message = f"--batch-invariant needs --weights int4 or int8, not {settings.weight_format}"
        raise ConfigError("batch-invariant mode", message)
    default_threads = rendezvous.threads() if rendezvous else os.cpu_count() or 1
    torch.set_num_threads(settings.threads or default_threads)
    path: Path = resolve_model(settings.model)
    checkpoint = load_checkpoint(path)
    if settings.device == "tt":  # a split that does not divide: refused before the device opens
        mesh_plan(resolve_mesh(settings.mesh), checkpoint.config)
    card = check_card(checkpoint)
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    runner = build_runner(settings, checkpoint, card, rendezvous)
    collab_config = None if collab is None else build_collab(collab, settings, checkpoint, runner)
    engine = Engine(
        runner,
        lambda prompt_ids: tokenizer.detokenizer(prompt_ids=prompt_ids),
        eos_token_ids=tuple(tokenizer.eos_token_ids | set(checkpoint.config.eos_token_ids)),
        scheduler_config=SchedulerConfig(
            settings.max_num_seqs, settings.max_num_batched_tokens, policy=settings.scheduling
        ),
        max_queue_len=settings.max_queue_len,
        collab=collab_config,
    )
    return LoadedEngine(engine, tokenizer, checkpoint, card, time.perf_counter() - started)
