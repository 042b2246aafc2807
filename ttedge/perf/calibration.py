"""The per-op overhead of ttedge.perf.model_roofline, fitted to measured step times: least squares on the
relative error of ``roofline + ops x overhead`` against each measurement, which has a closed form.

- Tenstorrent: Tenstorrent's published batch-1 decode speeds in the model cards (tt-metal PERF.md), one
  overhead per chip family (Wormhole, Blackhole), fitted when first asked for.
- This machine's CPU: scripts/validate_planner.py fits it to bench_decode's measurements; the constant
  below is its result, the error per configuration is in docs/planner.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ttedge import model_zoo
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.perf.model_roofline import decode_step_time, pass_ops
from ttedge.perf.precision import Precision

# scripts/validate_planner.py --read-gb-s 21.8 (2026-11-30 18:31 UTC): SmolLM2-135M against the bench_decode
# table of docs/benchmarks.md (13:00 UTC, a quiet machine), every format at batch 1, 8 and 32.
CPU_OP_OVERHEAD_S = 60e-6
# ASSUMPTION: the prompt and context of tt-metal PERF.md's batch-1 measurements (a short prompt, then 200
# decode steps); at batch 1 the KV cache is a few percent of the weights either way.
PUBLISHED_PROMPT_TOKENS = 128
PUBLISHED_CONTEXT = 256


@dataclass(frozen=True)
class Observation:
    """A measured step and what the model says without overhead: ``roofline_seconds`` and ``ops``; for a
    published deployment also its time to first token, which the fit does not use."""

    label: str
    measured_seconds: float
    roofline_seconds: float
    ops: int
    published_ttft_s: float | None = None

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


def published_observations(family: Sequence[str]) -> list[Observation]:
    """Every model card deployment on a system of ``family`` with a published decode speed."""
    from ttedge.perf.systems import TENSTORRENT_SYSTEMS

    observations = []
    for card in model_zoo.load_cards().values():
        for deployment in card.tt.deployments:
            if deployment.system not in family or deployment.published_decode_tok_s_u is None:
                continue
            system = TENSTORRENT_SYSTEMS[deployment.system]
            plan = plan_tensor_parallel(card.config, system.chips)
            precision = Precision.from_preset(card.tt.preset(deployment.preset))
            step = decode_step_time(plan, precision, system.chip, system.mesh, 0.0, 1, PUBLISHED_CONTEXT)
            observations.append(
                Observation(
                    label=f"{card.id} {deployment.system} {deployment.preset}",
                    measured_seconds=1.0 / deployment.published_decode_tok_s_u,
                    roofline_seconds=step.seconds,
                    ops=pass_ops(card.config),
                    published_ttft_s=None
                    if deployment.published_ttft_ms is None
                    else deployment.published_ttft_ms / 1e3,
                )
            )
    return observations


@functools.cache
def tenstorrent_op_overhead(family: tuple[str, ...]) -> float:
    return fit_op_overhead(published_observations(family))
