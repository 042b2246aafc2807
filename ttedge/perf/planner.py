"""The capacity planner behind `ttedge plan`: does a model fit on a system with so many users at so long a
context, how fast will it serve them, what to change when it does not fit, and the smallest system of the
family that serves the target.

Predictions are the layer-by-layer roofline of ttedge.perf.model_roofline plus its calibrated per-op
overhead (ttedge.perf.calibration); docs/planner.md has the arithmetic and its error against measurements.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ttedge import model_zoo
from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.sharding import ShardingError, TensorParallelPlan, plan_tensor_parallel
from ttedge.model_zoo import ModelCard
from ttedge.perf.calibration import (
    CPU_OP_OVERHEAD_S,
    derated,
    tenstorrent_op_overhead,
    tenstorrent_prefill_efficiency,
)
from ttedge.perf.memory import MemoryFit, kv_bytes_per_token, memory_fit
from ttedge.perf.model_roofline import PassTime, decode_step_time, prefill_time
from ttedge.perf.precision import Precision, cpu_precision
from ttedge.perf.speculative import MAX_DRAFT_TOKENS, SpeculativeEstimate, speculative_estimate
from ttedge.perf.systems import System, family_of, get_system
from ttedge.runtime.tt_host import BLOCK_TOKENS, DEFAULT_PRESET, MAX_PREFILL_TOKENS


class PlanError(ValueError):
    """A question the planner cannot answer: a split that does not divide, a preset the card lacks."""


@dataclass(frozen=True)
class Target:
    """What to serve: ``batch`` users at once, each up to ``context`` tokens, prompts of ``prompt_tokens``,
    and optionally a floor on tokens/s per user."""

    batch: int
    context: int
    prompt_tokens: int
    min_tok_s_per_user: float = 0.0

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise PlanError(f"batch must be at least 1, got {self.batch}")
        if self.context < 1:
            raise PlanError(f"context must be at least 1 token, got {self.context}")
        if not 1 <= self.prompt_tokens <= self.context:
            raise PlanError(f"a prompt has 1 to context ({self.context}) tokens, got {self.prompt_tokens}")
        if self.min_tok_s_per_user < 0:
            raise PlanError(f"a tokens/s floor must not be negative, got {self.min_tok_s_per_user}")


@dataclass(frozen=True)
class Draft:
    """A draft model for speculative decoding and the acceptance rate it reaches with the target."""

    config: ModelConfig
    precision: Precision
    acceptance: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.acceptance <= 1.0:
            raise PlanError(f"acceptance is a rate between 0 and 1, got {self.acceptance}")


@dataclass(frozen=True)
class Estimate:
    system: System
    precision: Precision
    target: Target
    memory: MemoryFit
    prefill: PassTime
    decode_step: PassTime
    op_overhead_s: float
    prefill_efficiency: float
    speculative: SpeculativeEstimate | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def ttft_s(self) -> float:
        """Prefill of one prompt and its first token, on an otherwise idle system."""
        return self.prefill.seconds

    @property
    def tok_s_per_user(self) -> float:
        """Decode speed at the full context, with the draft's speed-up when there is one."""
        if self.speculative is not None:
            return 1.0 / self.speculative.seconds_per_token
        return 1.0 / self.decode_step.seconds

    @property
    def aggregate_tok_s(self) -> float:
        return self.target.batch * self.tok_s_per_user

    @property
    def serves(self) -> bool:
        return self.memory.fits and self.tok_s_per_user >= self.target.min_tok_s_per_user


def op_overhead(system: System) -> float:
    return tenstorrent_op_overhead(family_of(system)) if system.is_tenstorrent else CPU_OP_OVERHEAD_S


def prefill_efficiency(system: System) -> float:
    """The fraction of peak FLOP/s prefill is credited with: fitted to published times to first token on
    Tenstorrent systems; 1 on the CPU, whose roofs are measured matmul rates already."""
    return tenstorrent_prefill_efficiency(family_of(system)) if system.is_tenstorrent else 1.0


def precision_for(card: ModelCard | None, system: System, name: str | None, batch: int) -> Precision:
    """The card's preset ``name`` (default: its recommended one) on a Tenstorrent system, tt_transformers'
    default for a model without a card; a CPU weight format (default ``auto``) on the CPU."""
    if not system.is_tenstorrent:
        try:
            return cpu_precision(name or "auto", batch)
        except ValueError as err:
            raise PlanError(f"--precision on the CPU: {err}") from None
    if card is None:
        if name not in (None, DEFAULT_PRESET.name):
            raise PlanError(f"no model card, so no preset {name!r}: only {DEFAULT_PRESET.name!r}")
        return Precision.from_preset(DEFAULT_PRESET)
    if name is None:
        name = card.tt.deployments[0].preset
    try:
        return Precision.from_preset(card.tt.preset(name))
    except KeyError as err:
        raise PlanError(f"{card.id}: {err.args[0]}") from None


def tensor_parallel(config: ModelConfig, system: System) -> TensorParallelPlan:
    try:
        return plan_tensor_parallel(config, system.chips)
    except ShardingError as err:
        raise PlanError(
            f"{config.name} does not split over {system.name}'s {system.chips} chips: {err}"
        ) from None


def estimate(
    config: ModelConfig, precision: Precision, system: System, target: Target, draft: Draft | None = None
) -> Estimate:
    """Memory, time to first token and decode speed of ``config`` on ``system`` for ``target``."""
    plan = tensor_parallel(config, system)
    overhead = op_overhead(system)
    fit = memory_fit(
        plan,
        precision,
        system.chip.dram_bytes,
        target.batch,
        target.context,
        target.prompt_tokens,
        on_tenstorrent=system.is_tenstorrent,
    )
    # The CPU's `auto` format reads other weights at a prompt's many rows than at a decode batch's few.
    prefill_precision = (
        precision
        if system.is_tenstorrent
        else cpu_precision(precision.name, min(target.prompt_tokens, MAX_PREFILL_TOKENS))
    )
    efficiency = prefill_efficiency(system)
    prefill_chip = derated(system.chip, efficiency)
    prefill = prefill_time(plan, prefill_precision, prefill_chip, system.mesh, overhead, target.prompt_tokens)
    step = decode_step_time(plan, precision, system.chip, system.mesh, overhead, target.batch, target.context)
    notes: list[str] = []
    speculative = None
    if draft is not None:
        draft_plan = tensor_parallel(draft.config, system)
        # The draft shares the chips: its weights and its own KV cache come out of the same DRAM.
        draft_fit = memory_fit(
            draft_plan, draft.precision, system.chip.dram_bytes, target.batch, target.context, 1, False
        )
        fit = replace(
            fit, weights=fit.weights + draft_fit.weights, kv_cache=fit.kv_cache + draft_fit.kv_cache
        )
        draft_step = decode_step_time(
            draft_plan, draft.precision, system.chip, system.mesh, overhead, target.batch, target.context
        ).seconds
        speculative = max(
            (
                speculative_estimate(
                    draft.acceptance,
                    k,
                    draft_step,
                    decode_step_time(
                        plan,
                        precision,
                        system.chip,
                        system.mesh,
                        overhead,
                        target.batch,
                        target.context,
                        k + 1,
                    ).seconds,
                    step.seconds,
                )
                for k in range(1, MAX_DRAFT_TOKENS + 1)
            ),
            key=lambda s: s.speedup,
        )
        if speculative.speedup < 1.0:
            notes.append(
                f"the draft slows decoding down ({speculative.speedup:.2f}x at best, k = "
                f"{speculative.draft_tokens}): serve without it"
            )
    return Estimate(
        system, precision, target, fit, prefill, step, overhead, efficiency, speculative, tuple(notes)
    )


def _kv_bytes_per_token(estimate_: Estimate, config: ModelConfig, draft: Draft | None) -> float:
    """K and V of one token on one chip, the draft's own cache included."""
    system = estimate_.system
    per_token = kv_bytes_per_token(tensor_parallel(config, system), estimate_.precision)
    if draft is not None:
        per_token += kv_bytes_per_token(tensor_parallel(draft.config, system), draft.precision)
    return per_token


def largest_batch(estimate_: Estimate, config: ModelConfig, draft: Draft | None = None) -> int:
    """The most users of the target's context the KV cache room left by everything else holds."""
    context = -(-estimate_.target.context // BLOCK_TOKENS) * BLOCK_TOKENS
    per_user = context * _kv_bytes_per_token(estimate_, config, draft)
    return max(0, int(estimate_.memory.free_for_kv // per_user))


def longest_context(estimate_: Estimate, config: ModelConfig, draft: Draft | None = None) -> int:
    """The longest context, in whole 32-token blocks, at which the target's users still fit."""
    per_token = estimate_.target.batch * _kv_bytes_per_token(estimate_, config, draft)
    tokens = int(estimate_.memory.free_for_kv // per_token)
    return max(0, tokens // BLOCK_TOKENS * BLOCK_TOKENS)


def suggestions(
    estimate_: Estimate, config: ModelConfig, card: ModelCard | None, draft: Draft | None = None
) -> list[str]:
    """What to change so that ``estimate_`` fits (and meets its speed floor), most direct first."""
    if estimate_.serves:
        return []
    target, system = estimate_.target, estimate_.system
    advice = []
    if not estimate_.memory.fits:
        if system.is_tenstorrent and card is not None:
            for preset in card.tt.presets:
                if preset.name == estimate_.precision.name:
                    continue
                other = estimate(config, Precision.from_preset(preset), system, target, draft)
                if other.memory.fits:
                    advice.append(
                        f"use --precision {preset.name}: it needs {gigabytes(other.memory.needed)} per chip"
                    )
        batch = largest_batch(estimate_, config, draft)
        if batch >= 1:
            advice.append(f"serve at most {batch} users at {target.context} tokens of context")
        context = longest_context(estimate_, config, draft)
        if context >= BLOCK_TOKENS:
            advice.append(f"or limit the context to {context} tokens for {target.batch} users")
        if (
            estimate_.memory.weights + estimate_.memory.reserved + estimate_.memory.trace
            > estimate_.memory.capacity
        ):
            advice.append(f"the weights alone ({gigabytes(estimate_.memory.weights)} per chip) do not fit")
    if system.is_tenstorrent:
        ladder = family_of(system)
        larger = ladder[ladder.index(system.name) + 1 :]
        bigger = smallest_system(config, card, estimate_.precision.name, target, draft, larger)
        if bigger is not None:
            either = "or " if advice else ""
            advice.append(
                f"{either}use --hardware {bigger.system.name} ({bigger.tok_s_per_user:.1f} tok/s/user there)"
            )
    if estimate_.memory.fits and estimate_.tok_s_per_user < target.min_tok_s_per_user:
        advice.insert(
            0,
            f"{estimate_.tok_s_per_user:.1f} tok/s/user is below the floor of {target.min_tok_s_per_user:g}: "
            "fewer users, a shorter context or a faster system",
        )
    return advice


def smallest_system(
    config: ModelConfig,
    card: ModelCard | None,
    precision_name: str | None,
    target: Target,
    draft: Draft | None,
    systems: Sequence[str],
) -> Estimate | None:
    """The first of ``systems`` that fits the target and meets its speed floor, skipping those the model
    does not split over (or whose card lacks the preset)."""
    for name in systems:
        system = get_system(name)
        try:
            precision = precision_for(card, system, precision_name, target.batch)
            candidate = estimate(config, precision, system, target, draft)
        except PlanError:
            continue
        if candidate.serves:
            return candidate
    return None


def resolve_model(name: str) -> tuple[ModelCard | None, ModelConfig]:
    """A model card by any of its names, or a Hugging Face config.json (or a directory holding one), with
    the card whose architecture it has, if any."""
    card = model_zoo.find_card(name)
    if card is not None:
        return card, card.config
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        cards = ", ".join(model_zoo.load_cards())
        raise PlanError(f"{name!r} is neither a model card ({cards}) nor a config.json")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: not a readable config.json ({err})") from None
    config = ModelConfig.from_hf(hf, str(path), name=path.parent.name)
    return model_zoo.match_card(config), config


def gigabytes(size: float) -> str:
    return f"{size / 1e9:.2f} GB"


@dataclass(frozen=True)
class Tier:
    """A deployment tier: how many users at what context, and the systems it may use, smallest first."""

    name: str
    target: Target
    systems: tuple[str, ...]


# Device: one user on one card; edge server: a batch of 32 (one decode tile row) on a workstation's cards;
# cloud: 128 users at a long context on a rack system. Systems in order of DRAM.
TIERS = (
    Tier("device", Target(batch=1, context=4096, prompt_tokens=1024), ("n150", "p100", "p150")),
    Tier(
        "edge server",
        Target(batch=32, context=4096, prompt_tokens=1024),
        ("n150", "n300", "p100", "p150", "p150x4", "t3k"),
    ),
    Tier("cloud", Target(batch=128, context=8192, prompt_tokens=1024), ("t3k", "p150x8", "galaxy")),
)


def tier_estimate(card: ModelCard, tier: Tier) -> Estimate | None:
    """The smallest system of ``tier`` that fits ``card``'s model at its recommended preset, or None."""
    return smallest_system(card.config, card, None, tier.target, None, tier.systems)
