"""The TT-Lang namespaces the kernels are written against: ``ttl`` (the DSL) and ``ttnn`` (device tensors).

With the compiler (PyPI ``tt-lang``, on a machine with a card) they are the real packages. With only the
functional simulator (PyPI ``tt-lang-sim``) installed, its ``ttl`` package holds no DSL of its own and the
simulator's namespaces stand in, which is what its ``tt-lang-sim`` launcher does by shadowing ``sys.modules``.
The kernels name the DSL ``ttl`` either way: the compiler recognises ``ttl.*`` calls by that name in the
kernel's source.

Importing this module with the simulator has a process-wide side effect: the simulator rebinds
``torch.bfloat16`` and ``torch.float16`` to ``torch.float32`` (it computes in float32). Import it only in a
process that exists to run kernels: ``ttedge.kernels.simulation`` does so in a worker process.
"""

from __future__ import annotations

from typing import Any

import torch
import ttl as _ttl_package

from ttedge.kernels.footprint import TILE

SIMULATED: bool = bool(_ttl_package._SIM_ONLY_INSTALL)

if SIMULATED:
    from ttl.sim import ttl, ttnn
else:  # pragma: no cover - needs tt-lang and a card
    import ttnn

    ttl = _ttl_package

# Bytes of one tile on the card: what the simulator's tile counts weigh in DRAM traffic.
FLOAT32_TILE_BYTES = TILE * TILE * 4


def device_tensor(tensor: torch.Tensor, dtype: Any, device: Any) -> Any:
    """A tile-layout device tensor from a 2-D host tensor whose sides are whole tiles."""
    if tensor.dim() != 2 or any(side % TILE for side in tensor.shape):
        raise ValueError(f"kernel tensors are 2-D with whole {TILE}x{TILE} tiles, got {tuple(tensor.shape)}")
    return ttnn.from_torch(tensor.contiguous(), dtype=dtype, layout=ttnn.TILE_LAYOUT, device=device)


def host_tensor(tensor: Any) -> torch.Tensor:
    return ttnn.to_torch(tensor).float()


def pad_rows(tensor: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``tensor`` with rows appended up to a whole tile row, set to ``fill``."""
    missing = -tensor.shape[0] % TILE
    return torch.cat([tensor, tensor.new_full((missing, *tensor.shape[1:]), fill)]) if missing else tensor
