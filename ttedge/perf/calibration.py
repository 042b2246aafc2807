"""The per-op overhead of ttedge.perf.model_roofline, fitted to measured step times: least squares on the
relative error of ``roofline + ops x overhead`` against each measurement, which has a closed form.

- Tenstorrent: Tenstorrent's published batch-1 decode speeds in the model cards (tt-metal PERF.md), one
  overhead per chip family (Wormhole, Blackhole), fitted when first asked for; then the fraction of peak
  FLOP/s prefill reaches, fitted to the published times to first token.
- This machine's CPU: scripts/validate_planner.py fits it to bench_decode's measurements; the constant
  below is its result, the error per configuration is in docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ttedge import model_zoo
from ttedge.ethernet_mesh.sharding import TensorParallelPlan, plan_tensor_parallel
from ttedge.perf.hardware import HardwareSpec
from ttedge.perf.model_roofline import decode_step_time, pass_ops, prefill_time
from ttedge.perf.precision import Precision
from ttedge.perf.systems import TENSTORRENT_SYSTEMS, System

# scripts/validate_planner.py --read-gb-s 21.8 (2026-11-30 18:31 UTC): SmolLM2-135M against the bench_decode
# table of docs/benchmarks.md (13:00 UTC, a quiet machine), every format at batch 1, 8 and 32.
CPU_OP_OVERHEAD_S = 60e-6
# ASSUMPTION: the prompt and context of tt-metal PERF.md's batch-1 measurements (a short prompt, then 200
# decode steps); at batch 1 the KV cache is a few percent of the weights either way.
PUBLISHED_PROMPT_TOKENS = 128
PUBLISHED_CONTEXT = 256


@dataclass(frozen=True)
class Observation:
    """A measured step and what the model says without overhead: ``roofline_seconds`` and ``ops``."""

    label: str
    measured_seconds: float
    roofline_seconds: float
    ops: int

    def predicted(self, op_overhead_s: float) -> float:
        return self.roofline_seconds + self.ops * op_overhead_s

    def relative_error(self, op_overhead_s: float) -> float:
        """(predicted - measured) / measured."""
        return self.predicted(op_overhead_s) / self.measured_seconds - 1.0


def fit_op_overhead(observations: Sequence[Observation]) -> float:
    """The overhead minimising the sum of squared relative errors: with m measured, r roofline and n ops,
    ``sum n (m - r) / m^2 / sum n^2 / m^2``. Never negative: where the roofline alone is slower than the
    measurement (data served from caches) no overhead is the best a non-negative one can do."""
    if not observations:
        raise ValueError("fitting an overhead needs at least one measurement")
    numerator = sum(
        o.ops * (o.measured_seconds - o.roofline_seconds) / o.measured_seconds**2 for o in observations
    )
    denominator = sum(o.ops**2 / o.measured_seconds**2 for o in observations)
    return max(0.0, numerator / denominator)


@dataclass(frozen=True)
class PublishedDeployment:
    """A model card's deployment with Tenstorrent's published batch-1 numbers, ready to predict."""

    label: str
    plan: TensorParallelPlan
    precision: Precision
    system: System
    decode_s: float
    ttft_s: float | None


def published_deployments(family: Sequence[str]) -> list[PublishedDeployment]:
    """Every model card deployment on a system of ``family`` with a published decode speed."""
    deployments = []
    for card in model_zoo.load_cards().values():
        for deployment in card.tt.deployments:
            if deployment.system not in family or deployment.published_decode_tok_s_u is None:
                continue
            system = TENSTORRENT_SYSTEMS[deployment.system]
            ttft_ms = deployment.published_ttft_ms
            deployments.append(
                PublishedDeployment(
                    label=f"{card.id} {deployment.system} {deployment.preset}",
                    plan=plan_tensor_parallel(card.config, system.chips),
                    precision=Precision.from_preset(card.tt.preset(deployment.preset)),
                    system=system,
                    decode_s=1.0 / deployment.published_decode_tok_s_u,
                    ttft_s=None if ttft_ms is None else ttft_ms / 1e3,
                )
            )
    return deployments


def published_observations(family: Sequence[str]) -> list[Observation]:
    """The published decode steps of ``family`` against the model's roofline."""
    observations = []
    for d in published_deployments(family):
        step = decode_step_time(d.plan, d.precision, d.system.chip, d.system.mesh, 0.0, 1, PUBLISHED_CONTEXT)
        observations.append(Observation(d.label, d.decode_s, step.seconds, pass_ops(d.plan.config)))
    return observations


@functools.cache
def tenstorrent_op_overhead(family: tuple[str, ...]) -> float:
    return fit_op_overhead(published_observations(family))


def derated(chip: HardwareSpec, efficiency: float) -> HardwareSpec:
    """``chip`` with every peak FLOP/s scaled by ``efficiency``: what prefill's matmuls reach."""
    if not 0.0 < efficiency <= 1.0:
        raise ValueError(f"an efficiency is in (0, 1], got {efficiency}")
    return dataclasses.replace(chip, peak_flops={k: v * efficiency for k, v in chip.peak_flops.items()})


def published_ttft(deployment: PublishedDeployment, op_overhead_s: float, efficiency: float) -> float:
    """The model's time to first token for ``deployment``'s published prompt."""
    chip = derated(deployment.system.chip, efficiency)
    return prefill_time(
        deployment.plan,
        deployment.precision,
        chip,
        deployment.system.mesh,
        op_overhead_s,
        PUBLISHED_PROMPT_TOKENS,
    ).seconds


@functools.cache
def tenstorrent_prefill_efficiency(family: tuple[str, ...]) -> float:
    """The fraction of the spec sheet's peak FLOP/s that makes prefill match the published times to first
    token best (least squares on the relative error), to the nearest 1%: a grid in 5% steps, then 1% steps
    around its best. Prefill runs at higher math fidelity than the spec sheet's peak and without a trace."""
    overhead = tenstorrent_op_overhead(family)
    with_ttft = [d for d in published_deployments(family) if d.ttft_s is not None]
    if not with_ttft:
        return 1.0

    def squared_error(efficiency: float) -> float:
        return sum(
            (published_ttft(d, overhead, efficiency) / d.ttft_s - 1.0) ** 2 for d in with_ttft if d.ttft_s
        )

    coarse = min((i / 20 for i in range(1, 21)), key=squared_error)
    fine = (round(coarse + i / 100, 2) for i in range(-4, 5))
    return min((e for e in fine if 0.0 < e <= 1.0), key=squared_error)
