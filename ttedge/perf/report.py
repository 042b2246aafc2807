"""What `ttedge plan` prints: one estimate with its memory budget and advice, or the tiers table."""

from __future__ import annotations

from collections.abc import Sequence

from ttedge.config import ModelConfig
from ttedge.model_zoo import ModelCard
from ttedge.perf.memory import kv_bytes_per_token
from ttedge.perf.planner import TIERS, Estimate, gigabytes, tensor_parallel, tier_estimate


def describe(
    estimate: Estimate,
    config: ModelConfig,
    name: str,
    advice: Sequence[str],
    smallest: Estimate | None,
) -> str:
    system, precision, target, memory = estimate.system, estimate.precision, estimate.target, estimate.memory
    chips = f"{system.chips} chip{'s' if system.chips > 1 else ''}, " if system.is_tenstorrent else ""
    plan = tensor_parallel(config, system)
    per_token = kv_bytes_per_token(plan, precision)
    with_draft = estimate.speculative is not None
    lines = [
        f"{name} on {system.name} ({chips}{system.chip.name}), precision {precision.name}: "
        f"attention {precision.attention}, MLP {precision.mlp}, LM head {precision.lm_head}, "
        f"KV cache {precision.kv_cache}",
        f"{target.batch} user{'s' if target.batch > 1 else ''} x {target.context} tokens of context, "
        f"prompts of {target.prompt_tokens} tokens",
        "",
        f"memory per chip: {'fits' if memory.fits else 'DOES NOT FIT'} "
        f"({gigabytes(memory.needed)} needed of {gigabytes(memory.capacity)})",
        f"  weights      {gigabytes(memory.weights):>10}{'   (model and draft)' if with_draft else ''}",
        f"  KV cache     {gigabytes(memory.kv_cache):>10}   ({'model and draft; ' if with_draft else ''}"
        f"the model's {per_token / 1e3:.1f} KB per token per chip)",
        f"  activations  {gigabytes(memory.activations):>10}",
    ]
    if system.is_tenstorrent:
        lines += [
            f"  trace        {gigabytes(memory.trace):>10}",
            f"  reserved     {gigabytes(memory.reserved):>10}",
        ]
    step = estimate.decode_step
    lines += [
        "",
        f"predicted (roofline + {estimate.op_overhead_s * 1e6:.0f} us per op, prefill at "
        f"{estimate.prefill_efficiency:.0%} of peak FLOP/s; error in docs/planner.md):",
        f"  time to first token  {estimate.ttft_s * 1e3:8.0f} ms   (one prompt on an idle system)",
        f"  decode per user      {estimate.tok_s_per_user:8.1f} tok/s   (at the full context)",
        f"  decode aggregate     {estimate.aggregate_tok_s:8.1f} tok/s",
        f"  one decode step      {step.seconds * 1e3:8.2f} ms   = layers {step.layers * 1e3:.2f} "
        f"({step.memory_bound_fraction:.0%} memory-bound) + LM head {step.lm_head * 1e3:.2f} + overhead "
        f"{step.overhead * 1e3:.2f} + collectives {step.collectives * 1e3:.2f}",
    ]
    spec = estimate.speculative
    if spec is not None:
        lines.append(
            f"  with the draft       {spec.speedup:8.2f}x   (best k = {spec.draft_tokens}: "
            f"{spec.tokens_per_step:.2f} tokens per {spec.step_seconds * 1e3:.2f} ms step)"
        )
    lines += [f"  note: {note}" for note in estimate.notes]
    if advice:
        lines += ["", "to serve this:", *(f"  - {line}" for line in advice)]
    if system.is_tenstorrent:
        lines.append("")
        if smallest is None:
            lines.append(f"no system of {system.name}'s family serves this target")
        else:
            lines.append(
                f"smallest system of the family that serves this: {smallest.system.name} "
                f"({smallest.tok_s_per_user:.1f} tok/s/user, {smallest.aggregate_tok_s:.0f} tok/s aggregate)"
            )
    return "\n".join(lines)


def tiers_table(cards: Sequence[ModelCard]) -> str:
    """The smallest system per model and tier, at each card's recommended preset (markdown)."""
    header = (
        "| model | parameters | tier | users x context | smallest system | precision | memory per chip "
        "| TTFT (1024-token prompt) | tok/s/user | aggregate tok/s |"
    )
    lines = [header, "|---|---:|---|---|---|---|---:|---:|---:|---:|"]
    for card in sorted(cards, key=lambda c: c.parameters):
        for tier in TIERS:
            target = tier.target
            found = tier_estimate(card, tier)
            users = f"{target.batch} x {target.context}"
            start = f"| {card.name} | {card.parameters / 1e9:.2f} B | {tier.name} | {users} |"
            if found is None:
                lines.append(f"{start} none of {', '.join(tier.systems)} | | | | | |")
                continue
            lines.append(
                f"{start} {found.system.name} | {found.precision.name} | {gigabytes(found.memory.needed)} | "
                f"{found.ttft_s * 1e3:.0f} ms | {found.tok_s_per_user:.1f} | {found.aggregate_tok_s:.0f} |"
            )
    return "\n".join(lines)
