"""The self-speculative draft: some of the target's own layers and a small exit adapter.

A draft made by ``LlamaModel.layer_subset(layer_indices, exit_adapter)`` shares every weight with the
target (embedding, the kept layers, final norm, LM head); what it owns is its KV cache and the adapter,
which maps the last kept layer's hidden states towards what the target's last layer would give.

The adapter is a residual SwiGLU of low rank on an RMS-normalised input, and it keeps no KV cache (it
sees one position at a time), so the draft's cache is just its kept layers::

    adapter(x) = x + down(silu(gate(h)) * up(h)),   h = rms_norm(x) * norm

``down`` starts at zero in training, so an untrained adapter is the identity. ``residual_swiglu`` is the
one definition of this math: training calls it on trainable tensors with autograd
(``scripts/train_draft.py``), the draft through :class:`ExitAdapter` under inference mode.

A draft file is safetensors: the adapter's three tensors and metadata saying which target it was
trained for (a fingerprint of that target's config), which layers it keeps, and how it was made.
:func:`load_self_draft` refuses a file that does not fit the target, naming the file and the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ttedge.checkpoint.base import CheckpointError
from ttedge.config import ModelConfig

if TYPE_CHECKING:
    from ttedge.models.llama.reference import LlamaModel

ADAPTER_KIND = "residual-swiglu"
FILE_FORMAT = "ttedge-self-draft/1"
# The tensors of a residual-SwiGLU adapter, as named in a draft file.
NORM, GATE_UP, DOWN = "exit_adapter.norm", "exit_adapter.gate_up", "exit_adapter.down"
# The target config fields a draft depends on: its layers are indexed by num_layers, its adapter works on
# hidden_size, and its agreement was measured against that vocabulary's LM head.
FINGERPRINT_FIELDS = ("hidden_size", "vocab_size", "num_layers")


def config_fingerprint(config: ModelConfig) -> str:
    """What a draft file records of the target it was trained for, e.g. ``hidden_size=576 ...``."""
    return " ".join(f"{name}={getattr(config, name)}" for name in FINGERPRINT_FIELDS)


def residual_swiglu(
    x: torch.Tensor, norm: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x`` [N, hidden] plus a SwiGLU of rank ``down.shape[1]`` of its RMS norm; ``gate_up`` is
    [2 * rank, hidden] (gate rows first), ``down`` [hidden, rank]."""
    gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), norm, eps), gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


class ExitAdapter:
    """The adapter's inference form: ``[N, hidden] -> [N, hidden]`` in the dtype of its weights,
    which should be the model's activation dtype (the residual stream is kept in it)."""

    def __init__(self, norm: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, eps: float):
        self.norm = norm
        self.gate_up = gate_up
        self.down = down
        self.eps = eps

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return residual_swiglu(x, self.norm, self.gate_up, self.down, self.eps)


@dataclass(frozen=True)
class SelfDraft:
    """A draft for one target: which of its layers to keep and the adapter after the last of them."""

    layer_indices: tuple[int, ...]
    adapter: ExitAdapter
    metadata: dict[str, str]
    path: Path

    def draft_model(self, target: LlamaModel) -> LlamaModel:
        """The draft over ``target``'s weights; the adapter must be in the target's activation dtype
        (load with ``dtype=target.dtype``)."""
        if self.adapter.dtype != target.dtype:
            raise ValueError(f"{self.path}: adapter is {self.adapter.dtype}, the target runs {target.dtype}")
        return target.layer_subset(self.layer_indices, self.adapter)


def load_self_draft(
    path: str | Path, target_config: ModelConfig, dtype: torch.dtype = torch.bfloat16
) -> SelfDraft:
    """Read a draft file made for ``target_config``; its adapter comes back in ``dtype`` (the target's
    activation dtype). Raises :class:`CheckpointError` naming the file, and the tensor where one is at
    fault, for a missing or unreadable file, another target, missing tensors, wrong shapes and layer
    indices the target does not have."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such draft file")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = dict(file.metadata() or {})
            stored = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            path, f"not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None

    def field(key: str) -> str:
        if key not in metadata:
            raise CheckpointError(path, f"metadata has no {key!r}: not a ttedge self-draft file")
        return metadata[key]

    if field("format") != FILE_FORMAT:
        raise CheckpointError(path, f"format is {metadata['format']!r}, expected {FILE_FORMAT!r}")
    expected_fingerprint = config_fingerprint(target_config)
    if field("target_fingerprint") != expected_fingerprint:
        raise CheckpointError(
            path,
            f"trained for {field('target')} ({metadata['target_fingerprint']}), "
            f"but the target is {target_config.name} ({expected_fingerprint})",
        )
    if field("adapter_kind") != ADAPTER_KIND:
        raise CheckpointError(path, f"adapter kind {metadata['adapter_kind']!r} is not {ADAPTER_KIND!r}")
    layer_indices = _layer_indices(path, field("layer_indices"), target_config.num_layers)
    try:
        rank = int(field("adapter_rank"))
        eps = float(field("rms_norm_eps"))
    except ValueError as err:
        raise CheckpointError(path, f"bad adapter metadata: {err}") from None

    hidden = target_config.hidden_size
    shapes = {NORM: (hidden,), GATE_UP: (2 * rank, hidden), DOWN: (hidden, rank)}
    for name, shape in shapes.items():
        if name not in stored:
            raise CheckpointError(path, "missing from the draft file", name)
        if tuple(stored[name].shape) != shape:
            raise CheckpointError(
                path, f"shape {list(stored[name].shape)}, expected {list(shape)} (rank {rank})", name
            )
        if not stored[name].is_floating_point():
            raise CheckpointError(path, f"dtype {stored[name].dtype} is not a floating-point type", name)
    unknown = sorted(set(stored) - set(shapes))
    if unknown:
        raise CheckpointError(path, "not a tensor of a residual-SwiGLU exit adapter", unknown[0])
    adapter = ExitAdapter(stored[NORM].to(dtype), stored[GATE_UP].to(dtype), stored[DOWN].to(dtype), eps)
    return SelfDraft(layer_indices, adapter, metadata, path)


def _layer_indices(path: Path, text: str, num_layers: int) -> tuple[int, ...]:
    try:
        indices = json.loads(text)
    except json.JSONDecodeError:
        indices = None
    if not isinstance(indices, list) or not indices or not all(type(i) is int for i in indices):
        raise CheckpointError(path, f"layer_indices must be a JSON list of integers, got {text!r}")
    if indices != sorted(set(indices)):
        raise CheckpointError(path, f"layer_indices must be increasing and distinct, got {indices}")
    if indices[0] < 0 or indices[-1] >= num_layers:
        raise CheckpointError(
            path, f"layer_indices {indices} out of range: the target has layers 0 to {num_layers - 1}"
        )
    return tuple(indices)


def describe_layers(layer_indices: Sequence[int]) -> str:
    """``0-5`` for a run, ``0-3,29`` for runs and singles: how draft names and tables show a subset."""
    runs: list[list[int]] = []
    for index in layer_indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
