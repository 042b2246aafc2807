"""The step loop: schedule, run the model, sample, append, free what finished."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ttedge.collab.speculative import SpeculativeConfig, next_draft_budget, verify
from ttedge.engine.sampling import Sampler, SamplingParams, TokenLogprobs, token_logprobs
from ttedge.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from ttedge.engine.sequence import FinishReason, Sequence, SequenceStatus, TextStream
from ttedge.runtime.base import ModelRunner, StepInput
from ttedge.runtime.kv_cache import BLOCK_SIZE, OutOfBlocks


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long for the context or the KV cache)."""


class QueueFull(RuntimeError):
    """The engine holds as many requests as it may queue; the same request can succeed later."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs | None]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    # Speculative decoding since start: draft tokens verified, and how many of them were accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        text_stream_factory: Callable[[list[int]], TextStream],
        eos_token_ids: tuple[int, ...],
        scheduler_config: SchedulerConfig | None = None,
        max_queue_len: int | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        self.runner = runner
        self.text_stream_factory = text_stream_factory
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), runner.allocator)
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        # Requests allowed to wait beyond a full batch; None = unbounded (offline use).
        self.max_queue_len = max_queue_len
        self.speculative = speculative
        self.num_draft_tokens = self.num_accepted_draft_tokens = 0
        self._ids = itertools.count()

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> Sequence:
        if not prompt_ids:
            raise RequestRejected("the prompt is empty")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.sequences:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        vocab = self.runner.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"prompt token ids must lie in [0, {vocab})")
        max_len = self.runner.max_model_len
        if len(prompt_ids) >= max_len:
            raise RequestRejected(f"the prompt has {len(prompt_ids)} tokens; the context holds {max_len}")
        total = min(len(prompt_ids) + params.max_tokens, max_len)
        if not self.scheduler.fits_ever(total):
            raise RequestRejected(
                f"{total} tokens (prompt + max_tokens) exceed the whole KV cache "
                f"({self.runner.allocator.num_blocks} blocks)"
            )
        if self.max_queue_len is not None:
            capacity = self.scheduler.config.max_num_seqs + self.max_queue_len
            if self.scheduler.num_unfinished >= capacity:
                raise QueueFull(
                    f"{self.scheduler.num_unfinished} requests are in flight, the limit is {capacity} "
                    f"({self.scheduler.config.max_num_seqs} running + {self.max_queue_len} queued)"
                )
        seq = Sequence(request_id, list(prompt_ids), params, self.text_stream_factory(prompt_ids))
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.ABORT

    @property
    def max_sequence_len(self) -> int:
        """The most tokens (prompt + output) one sequence can reach: the context, or less when the
        whole KV cache holds less."""
        return min(self.runner.max_model_len, self.runner.allocator.num_blocks * BLOCK_SIZE)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> EngineStats:
        allocator = self.runner.allocator
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_used=allocator.num_blocks - allocator.num_free,
            kv_blocks_total=allocator.num_blocks,
            draft_tokens=self.num_draft_tokens,
            accepted_draft_tokens=self.num_accepted_draft_tokens,
        )

    def step(self) -> list[RequestOutput]:
        return self.execute(self.scheduler.schedule())

    def execute(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        """Run one scheduled step: forward, sample where a sequence is complete, append."""
        if not chunks:
            return []
        drafts = [self._draft(c) for c in chunks]
        inputs = [
            StepInput(
                token_ids=c.seq.token_slice(c.seq.num_computed, c.seq.num_computed + c.num_tokens) + d,
                start=c.seq.num_computed,
                block_table=c.seq.block_table,
                all_logits=bool(d),
            )
            for c, d in zip(chunks, drafts, strict=True)
        ]
        logits = self.runner.run(inputs)
        sampling = []
        outputs: list[RequestOutput] = []
        for chunk, rows, draft in zip(chunks, logits, drafts, strict=True):
            if not chunk.completes_sequence:
                chunk.seq.num_computed += chunk.num_tokens
            elif draft:
                outputs.append(self._verify(chunk, rows, draft))
            else:
                chunk.seq.num_computed += chunk.num_tokens
                sampling.append((chunk.seq, rows))
        if sampling:
            result = self.sampler.sample(
                torch.cat([row for _, row in sampling]),
                [seq.params for seq, _ in sampling],
                [seq.generator for seq, _ in sampling],
            )
            for (seq, _), token, logprob in zip(sampling, result.token_ids, result.logprobs, strict=True):
                outputs.append(self._append(seq, [token], [logprob]))
        return outputs

    def _draft(self, chunk: ScheduledChunk) -> list[int]:
        """Draft tokens to verify after a decoding sequence's last token, with KV slots for them; none
        for prefill chunks, near the sequence's limits, or when the slots are not free (drafting never
        preempts anyone)."""
        seq = chunk.seq
        if self.speculative is None or chunk.num_tokens != 1 or not chunk.completes_sequence:
            return []
        # Every accepted draft plus the big model's own token must fit the request and the context.
        room = min(
            seq.params.max_tokens - len(seq.output_ids),
            self.runner.max_model_len - seq.num_tokens,
        )
        if seq.draft_budget is None:
            seq.draft_budget = self.speculative.num_draft_tokens
        if seq.draft_budget == 0:
            seq.steps_without_drafts += 1
            if seq.steps_without_drafts < self.speculative.pause_steps:
                return []
            seq.draft_budget, seq.steps_without_drafts = 1, 0
        wanted = min(seq.draft_budget, room - 1)
        if wanted <= 0:
            return []
        draft = self.speculative.drafter.propose(seq.prompt_ids + seq.output_ids, wanted)[:wanted]
        if draft:
            try:
                self.runner.allocator.grow_table(seq.block_table, seq.num_tokens + len(draft))
            except OutOfBlocks:
                return []
        return draft

    def _verify(self, chunk: ScheduledChunk, logits: torch.Tensor, draft: list[int]) -> RequestOutput:
        seq = chunk.seq
        emitted = verify(logits, draft, seq.params, seq.generator)
        accepted = len(emitted) - 1
        self.num_draft_tokens += len(draft)
        self.num_accepted_draft_tokens += accepted
        assert self.speculative is not None and seq.draft_budget is not None  # set when drafting
        seq.draft_budget = next_draft_budget(seq.draft_budget, len(draft), accepted, self.speculative)
        # The last token and the accepted drafts are in the KV cache now; the slots of rejected drafts
        # lie past the sequence's length, so attention never reads them, and later tokens overwrite them.
        seq.num_computed += 1 + accepted
        params = [seq.params] * len(emitted)
        return self._append(seq, emitted, token_logprobs(logits[: len(emitted)], emitted, params))

    def _append(
        self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs | None]
    ) -> RequestOutput:
        """Append ``tokens`` in order, stopping at the first that finishes the sequence."""
        params = seq.params
        reason: FinishReason | None = None
        appended = 0
        for token, logprob in zip(tokens, logprobs, strict=True):
            seq.output_ids.append(token)
            seq.output_logprobs.append(logprob)
            appended += 1
            is_eos = not params.ignore_eos and token in self.eos_token_ids
            if is_eos or token in params.stop_token_ids or seq.append_text(seq.text_stream.add(token)):
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.runner.max_model_len:
                reason = FinishReason.LENGTH
                # A character cut in half by the length limit comes out as U+FFFD rather than vanishing.
                seq.append_text(seq.text_stream.finish())
            if reason is not None:
                break
        if reason is not None:
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            del self.sequences[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens[:appended],
            new_text=seq.take_new_text(),
            new_logprobs=logprobs[:appended],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion; the offline path for scripts and tests."""
        seqs = [self.add_request(p, params) for p in prompts]
        for _ in self.stream():
            pass
        return seqs

    def stream(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()
