"""The torch goldens the kernels are checked against: plain float32 torch, no TT-Lang."""

from __future__ import annotations

import torch


def residual_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)``: the new residual stream ``x + residual`` and its RMSNorm, as ``reference.RMSNorm``."""
    h = x.float() + residual.float()
    return h, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate.float()) * up.float()


def rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head_dim: int,
    rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``[rows, heads * head_dim]``, ``cos``/``sin`` ``[rows, head_dim]``: ``x * cos + (x @ R) * sin``
    per head. ``rotation`` ``R`` ``[head_dim, head_dim]`` is the kernel's input of that name; without it,
    Hugging Face's rotate-half, written out independently of any matrix."""
    heads = x.float().view(x.shape[0], -1, head_dim)
    if rotation is None:
        half = head_dim // 2
        rotated = torch.cat([-heads[..., half:], heads[..., :half]], dim=-1)
    elif rotation.shape != (head_dim, head_dim):
        raise ValueError(f"rotation {tuple(rotation.shape)} is not [{head_dim}, {head_dim}]")
    else:
        rotated = heads @ rotation.float()
    return (heads * cos[:, None].float() + rotated * sin[:, None].float()).view(x.shape)


def accepted_lengths(draft: torch.Tensor, target_argmax: torch.Tensor) -> torch.Tensor:
    """``draft`` ``[batch, k]``, ``target_argmax`` ``[batch, k + 1]``: per sequence, the number of leading
    drafts equal to the target's argmax (the loop of ``ttedge.collab.speculative.verify``, vectorised)."""
    k = draft.shape[1]
    matches = (draft == target_argmax[:, :k]).long()
    return matches.cumprod(dim=1).sum(dim=1)
