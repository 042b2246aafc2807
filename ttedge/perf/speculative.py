"""The speed-up of speculative decoding from the acceptance rate and the draft's cost (Leviathan et al.,
"Fast Inference from Transformers via Speculative Decoding", 2023, sections 3.1-3.4).

With each drafted token accepted independently with probability ``a`` and ``k`` tokens drafted per step,
a verify step yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average (the accepted prefix plus the target's
own token) and costs ``k`` draft steps and one verify step.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DRAFT_TOKENS = 8


def expected_tokens_per_step(acceptance: float, draft_tokens: int) -> float:
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"an acceptance rate is between 0 and 1, got {acceptance}")
    if draft_tokens < 0:
        raise ValueError(f"draft tokens must not be negative, got {draft_tokens}")
    if acceptance == 1.0:
        return float(draft_tokens + 1)
    return (1.0 - acceptance ** (draft_tokens + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class SpeculativeEstimate:
    draft_tokens: int
    tokens_per_step: float
    step_seconds: float  # k draft steps and one verify step
    plain_step_seconds: float

    @property
    def seconds_per_token(self) -> float:
        return self.step_seconds / self.tokens_per_step

    @property
    def speedup(self) -> float:
        return self.plain_step_seconds * self.tokens_per_step / self.step_seconds


def speculative_estimate(
    acceptance: float,
    draft_tokens: int,
    draft_step_seconds: float,
    verify_step_seconds: float,
    plain_step_seconds: float,
) -> SpeculativeEstimate:
    """Speculative decoding at ``draft_tokens`` per step: the verify step checks ``draft_tokens + 1``
    rows per sequence, so it costs more than a plain step once it leaves the memory-bound regime. A draft
    step may cost nothing on the device (prompt lookup searches the context on the host)."""
    if not draft_step_seconds >= 0:
        raise ValueError(f"a draft step takes no negative time, got {draft_step_seconds}")
    for name, seconds in (("verify", verify_step_seconds), ("plain", plain_step_seconds)):
        if not seconds > 0:
            raise ValueError(f"a {name} step takes a positive time, got {seconds}")
    return SpeculativeEstimate(
        draft_tokens=draft_tokens,
        tokens_per_step=expected_tokens_per_step(acceptance, draft_tokens),
        step_seconds=draft_tokens * draft_step_seconds + verify_step_seconds,
        plain_step_seconds=plain_step_seconds,
    )
