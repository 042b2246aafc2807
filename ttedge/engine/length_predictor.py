"""Response-length prediction from the prompt alone, before any forward pass.

The regressor is a ridge on the model's own input embeddings averaged over the prompt, predicting
the log of the greedy response length. A linear function of a mean of embeddings is the mean of a
per-token score (``score[t] = embedding[t] · w``), so the file holds one score per vocabulary entry
and a prediction is an average of table lookups: microseconds per request, no model access, and
available while the request waits, which is when the scheduler needs it (to order admissions and
size the KV reservation). ``scripts/train_length_predictor.py`` fits it and shows that richer
representations — the final hidden state of the prompt's last token, which the prefill computes
anyway but only once the request has been admitted — do not predict better on this model.

Log space because lengths span two orders of magnitude and errors are multiplicative; the exponent of
a least-squares log prediction estimates the median length, which minimises absolute error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_WEIGHTS = Path(__file__).with_name("length_predictor_smollm2_135m.npz")


@dataclass(frozen=True)
class LengthPredictor:
    token_scores: np.ndarray  # [vocab] each token's contribution to the mean, in log tokens
    bias: float  # log-length intercept
    max_tokens: int  # training responses were cut here, so predictions stop at it
    # Provenance: model, weight format, training-set size, held-out MAE.
    metadata: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.token_scores.ndim != 1 or not np.all(np.isfinite(self.token_scores)):
            raise ValueError("token_scores must be a finite vector with one score per vocabulary entry")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def vocab_size(self) -> int:
        return int(self.token_scores.shape[0])

    @classmethod
    def from_embedding_ridge(
        cls,
        embedding: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        weights: np.ndarray,
        bias: float,
        max_tokens: int,
        metadata: dict[str, object] | None = None,
    ) -> LengthPredictor:
        """Fold a ridge on standardised mean embeddings (``(x - mean) / scale @ weights + bias``) into
        per-token scores; ``embedding`` is the model's [vocab, hidden] input embedding table."""
        direction = weights / scale
        return cls(
            token_scores=(embedding.astype(np.float64) @ direction).astype(np.float32),
            bias=float(bias - mean @ direction),
            max_tokens=max_tokens,
            metadata=metadata or {},
        )

    def predict_log(self, prompts: list[list[int]]) -> np.ndarray:
        """Predicted log response lengths, one per prompt of token ids."""
        out = np.empty(len(prompts))
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError("cannot predict a response length for an empty prompt")
            if max(ids) >= self.vocab_size or min(ids) < 0:
                model = self.metadata.get("model", "another model")
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}): this length predictor was trained for "
                    f"{model}; train one for this model with scripts/train_length_predictor.py"
                )
            out[i] = self.bias + float(self.token_scores[ids].mean(dtype=np.float64))
        return out

    def predict(self, prompts: list[list[int]]) -> list[int]:
        """Predicted response lengths in tokens, each in [1, max_tokens]."""
        logs = np.clip(self.predict_log(prompts), 0.0, np.log(self.max_tokens))
        return [round(float(x)) for x in np.exp(logs)]

    def save(self, path: Path) -> None:
        header = {"bias": self.bias, "max_tokens": self.max_tokens, **self.metadata}
        with open(path, "wb") as f:
            np.savez_compressed(
                f,
                token_scores=self.token_scores.astype(np.float32),
                header=np.array(json.dumps(header, sort_keys=True)),
            )

    @classmethod
    def load(cls, path: Path = DEFAULT_WEIGHTS) -> LengthPredictor:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            scores = data["token_scores"].astype(np.float32)
        bias, max_tokens = header.pop("bias"), header.pop("max_tokens")
        return cls(token_scores=scores, bias=float(bias), max_tokens=int(max_tokens), metadata=header)
