"""Per-request sampling parameters and the batched sampler.

Every row of a batch may carry different parameters; the sampler groups the work so that a
batch of greedy requests costs one ``argmax``, and sampled rows share one sort for top-k/top-p.
Seeded requests draw from their own generator, so a seed reproduces the same text whatever else
shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class SamplingError(ValueError):
    """Sampling parameters out of range; the message names the parameter."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Number of most likely alternatives to report beside each chosen token's log-probability;
    # None = no log-probabilities at all.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise SamplingError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 a temperature picks the argmax all but surely, and dividing float32 logits by
        # it could overflow (5e-324 is even 0 in float32): such rows take the greedy path.
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass
class TokenLogprobs:
    token_logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SampleResult:
        """Pick one token per row of ``logits`` [N, vocab] (float32)."""
        num_rows = logits.shape[0]
        tokens = torch.empty(num_rows, dtype=torch.long)
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if greedy_rows:
            index = torch.tensor(greedy_rows)
            tokens[index] = logits[index].argmax(dim=-1)
        if sampled_rows:
            index = torch.tensor(sampled_rows)
            probs = filtered_probs(logits[index], [params[i] for i in sampled_rows])
            for slot, row in enumerate(sampled_rows):
                tokens[row] = draw(probs[slot], generators[row])

        token_list = tokens.tolist()
        return SampleResult(token_list, token_logprobs(logits, token_list, params))


def token_logprobs(
    logits: torch.Tensor, token_ids: list[int], params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Per row, the chosen token's log-probability and the top alternatives, for rows that ask."""
    logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        # Reported log-probabilities are those of the model's own distribution, before
        # temperature and filtering, as OpenAI's API reports them.
        log_softmax = torch.log_softmax(logits[torch.tensor(wanted)], dim=-1)
        for slot, row in enumerate(wanted):
            count = params[row].logprobs or 0
            top: list[tuple[int, float]] = []
            if count:
                values, ids = log_softmax[slot].topk(count)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            logprobs[row] = TokenLogprobs(float(log_softmax[slot, token_ids[row]]), top)
    return logprobs


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's sampling distribution: temperature, then top-k and top-p filtering."""
    temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
    scaled = logits / temperatures[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
        ranks = torch.arange(vocab)[None, :]
        drop = ranks >= top_k[:, None]
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The first token always survives, even a top_p that rounds
        # to 0 in float32.
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    return scaled.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` [vocab] (weights, need not sum to 1) with ``generator``."""
    return int(torch.multinomial(probs, 1, generator=generator))
