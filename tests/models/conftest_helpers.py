"""Running whole sequences through the CPU runner, for comparisons against transformers."""

from __future__ import annotations

import torch

from ttedge.runtime.base import StepInput
from ttedge.runtime.cpu import CpuModelRunner


def full_sequence_logits(runner: CpuModelRunner, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``token_ids`` from one prefill; the blocks are freed after."""
    table: list[int] = []
    runner.allocator.grow_table(table, len(token_ids))
    try:
        (logits,) = runner.run([StepInput(token_ids, 0, table, all_logits=True)])
    finally:
        runner.allocator.free(table)
    return logits


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over all elements, the metric tt_transformers' tests use."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))
