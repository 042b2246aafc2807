"""The step loop: schedule, run the model, sample, append, free what finished."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from ttedge.collab.drafters import Draft, DraftRequest
from ttedge.collab.speculative import accept_greedy, next_draft_budget, verify
from ttedge.collab.strategies import CollabConfig, CollabCounters, Route, Strategy, bild_accept
from ttedge.engine.sampling import Sampler, SamplingParams, TokenLogprobs, token_logprobs
from ttedge.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from ttedge.engine.sequence import FinishReason, Sequence, SequenceStatus, TextStream
from ttedge.runtime.base import GreedyOnDevice, ModelRunner, StepInput, VerifiesGreedyOnDevice
from ttedge.runtime.kv_cache import BLOCK_SIZE, OutOfBlocks


class RequestRejected(ValueError):
    """A request that can never be served as asked (too long for the context or the KV cache)."""


class StrategyUnavailable(RequestRejected):
    """The request asks for a big–little strategy this engine cannot run."""


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
    route: Route | None = None  # routed requests: the model that answers


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    collab: CollabCounters = field(default_factory=CollabCounters)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        text_stream_factory: Callable[[list[int]], TextStream],
        eos_token_ids: tuple[int, ...],
        scheduler_config: SchedulerConfig | None = None,
        max_queue_len: int | None = None,
        collab: CollabConfig | None = None,
    ):
        self.runner = runner
        self.text_stream_factory = text_stream_factory
        self.eos_token_ids = frozenset(eos_token_ids)
        self.scheduler = Scheduler(scheduler_config or SchedulerConfig(), runner.allocator)
        self.sampler = Sampler()
        self.sequences: dict[str, Sequence] = {}
        # Requests allowed to wait beyond a full batch; None = unbounded (offline use).
        self.max_queue_len = max_queue_len
        self.collab = collab
        self.counters = CollabCounters()
        self._ids = itertools.count()

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        strategy: Strategy | None = None,
    ) -> Sequence:
        """Queue a request; ``strategy`` None takes the engine's default (plain without a drafter)."""
        strategy = strategy or (self.collab.default_strategy if self.collab else Strategy.PLAIN)
        if strategy is not Strategy.PLAIN:
            if self.collab is None:
                raise StrategyUnavailable(
                    f"strategy {strategy.value!r} needs a drafter; this engine has none"
                )
            try:
                self.collab.check(strategy)
            except ValueError as err:
                raise StrategyUnavailable(str(err)) from None
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
        seq.strategy = strategy
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.remove(seq)
            self._finish(seq, FinishReason.ABORT)

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
            collab=replace(self.counters),
        )

    def step(self) -> list[RequestOutput]:
        return self.execute(self.scheduler.schedule())

    def execute(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        """Run one scheduled step: route new routed requests, draft, run the big model over its
        sequences and the small model over its own, verify or sample, append."""
        if not chunks:
            return []
        self._route([c.seq for c in chunks if c.seq.strategy is Strategy.ROUTED and c.seq.route is None])
        big = [c for c in chunks if not c.seq.on_small_model]
        small = [c for c in chunks if c.seq.on_small_model]
        drafts = self._drafts(big)
        inputs = [
            StepInput(
                token_ids=c.seq.token_slice(c.seq.num_computed, c.seq.num_computed + c.num_tokens) + d.tokens,
                start=c.seq.num_computed,
                block_table=c.seq.block_table,
                all_logits=bool(d.tokens),
            )
            for c, d in zip(big, drafts, strict=True)
        ]
        runner = self.runner
        if inputs and not small and self._exact_greedy(big):
            if isinstance(runner, VerifiesGreedyOnDevice):
                verdicts = runner.run_greedy_verify(inputs, [d.tokens for d in drafts])
                emitted = [
                    [*d.tokens[:accepted], token]
                    for (accepted, token), d in zip(verdicts, drafts, strict=True)
                ]
                return self._append_emitted(big, emitted, drafts)
            if isinstance(runner, GreedyOnDevice):
                ids = runner.run_greedy(inputs)
                emitted = [
                    accept_greedy(rows.tolist(), d.tokens) for rows, d in zip(ids, drafts, strict=True)
                ]
                return self._append_emitted(big, emitted, drafts)
        logits = self.runner.run(inputs) if inputs else []
        sampling = []
        outputs: list[RequestOutput] = []
        for chunk, rows, draft in zip(big, logits, drafts, strict=True):
            if not chunk.completes_sequence:
                chunk.seq.num_computed += chunk.num_tokens
            elif draft.tokens:
                outputs.append(self._verify(chunk, rows, draft.tokens))
            else:
                chunk.seq.num_computed += chunk.num_tokens
                sampling.append((chunk.seq, rows))
        sampling += self._small_model_rows(small)
        if sampling:
            result = self.sampler.sample(
                torch.cat([row for _, row in sampling]),
                [seq.params for seq, _ in sampling],
                [seq.generator for seq, _ in sampling],
            )
            for (seq, _), token, logprob in zip(sampling, result.token_ids, result.logprobs, strict=True):
                if seq.on_small_model:
                    self.counters.small_model_tokens += 1
                outputs.append(self._append(seq, [token], [logprob]))
        return outputs

    def _route(self, seqs: list[Sequence]) -> None:
        """Decide who answers each new routed request: the small model if it drafts a probe of the
        answer confidently, the big model otherwise (also when the small model cannot hold it)."""
        if not seqs:
            return
        assert self.collab is not None  # checked at admission
        config, small_model = self.collab, self.collab.small_model
        assert small_model is not None  # likewise
        probes = small_model.propose(
            [DraftRequest(s.request_id, s.prompt_ids + s.output_ids, config.route_probe_tokens) for s in seqs]
        )
        for seq, probe in zip(seqs, probes, strict=True):
            confident = bool(probe.confidences) and (
                sum(probe.confidences) / len(probe.confidences) >= config.route_threshold
            )
            seq.route = Route.SMALL if confident else Route.BIG
            seq.on_small_model = confident
            if confident:
                self.counters.routed_small += 1
            else:
                self.counters.routed_big += 1

    def _small_model_rows(self, chunks: list[ScheduledChunk]) -> list[tuple[Sequence, torch.Tensor]]:
        """Next-token logits from the small model for the sequences it writes. The big model's KV cache
        is not filled for them: their chunks only advance its bookkeeping."""
        completing = []
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
            if chunk.completes_sequence:
                completing.append(chunk.seq)
        if not completing:
            return []
        assert self.collab is not None and self.collab.small_model is not None  # checked at admission
        logits = self.collab.small_model.next_logits(
            [(s.request_id, s.prompt_ids + s.output_ids) for s in completing]
        )
        rows = []
        for seq, row in zip(completing, logits, strict=True):
            if row is None:
                # The small model's cache cannot hold it: the big model takes over and computes its KV
                # from the start in the coming steps.
                seq.on_small_model = False
                seq.num_computed = 0
            else:
                rows.append((seq, row[None]))
        return rows

    def _drafts(self, chunks: list[ScheduledChunk]) -> list[Draft]:
        """Drafts to verify after each decoding sequence's last token, with KV slots for them; none for
        prefill chunks, near the sequence's limits, or when the slots are not free (drafting never
        preempts anyone). One batched call of the drafter for the whole step."""
        drafts = [Draft() for _ in chunks]
        wanted = [(i, n) for i, c in enumerate(chunks) if (n := self._draft_budget(c))]
        cheap_rows, rows = self.runner.cheap_rows, sum(c.num_tokens for c in chunks)
        if cheap_rows is not None and rows <= cheap_rows:
            # Drafts fill the rows left below the threshold and no more: one row past it costs the whole
            # step the slower kernel. A step already past it (a prefill chunk) takes drafts freely.
            spare, capped = cheap_rows - rows, []
            for i, n in wanted:
                if take := min(n, spare):
                    capped.append((i, take))
                    spare -= take
            wanted = capped
        if not wanted:
            return drafts
        assert self.collab is not None  # a budget needs a drafting strategy
        fallback = self.collab.fallback_threshold
        requests = []
        for i, n in wanted:
            seq = chunks[i].seq
            min_confidence = fallback if seq.strategy is Strategy.BILD else 0.0
            requests.append(DraftRequest(seq.request_id, seq.prompt_ids + seq.output_ids, n, min_confidence))
        for (i, _), draft in zip(wanted, self.collab.drafter.propose(requests), strict=True):
            seq = chunks[i].seq
            if draft.unsure:
                self.counters.fallbacks += 1
            if draft.tokens:
                try:
                    self.runner.allocator.grow_table(seq.block_table, seq.num_tokens + len(draft.tokens))
                except OutOfBlocks:
                    continue
                drafts[i] = draft
        return drafts

    def _draft_budget(self, chunk: ScheduledChunk) -> int:
        """How many tokens to draft for ``chunk``'s sequence this step (0: none)."""
        seq = chunk.seq
        if not seq.strategy.drafts or chunk.num_tokens != 1 or not chunk.completes_sequence:
            return 0
        assert self.collab is not None  # checked at admission
        # Every accepted draft plus the big model's own token must fit the request and the context.
        room = min(
            seq.params.max_tokens - len(seq.output_ids),
            self.runner.max_model_len - seq.num_tokens,
        )
        if seq.strategy is Strategy.BILD:
            return max(0, min(self.collab.num_draft_tokens, room - 1))
        if seq.draft_budget is None:
            seq.draft_budget = self.collab.num_draft_tokens
        if seq.draft_budget == 0:
            seq.steps_without_drafts += 1
            if seq.steps_without_drafts < self.collab.pause_steps:
                return 0
            seq.draft_budget, seq.steps_without_drafts = 1, 0
        return max(0, min(seq.draft_budget, room - 1))

    def _exact_greedy(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether argmax token ids are all this step needs: every sequence greedy, without logprobs, and
        verified by exact match (BiLD's rollback needs the big model's distribution); a runner that picks
        greedy tokens on its device then sends only those."""
        return all(
            c.seq.params.greedy
            and c.seq.params.logprobs is None
            and c.seq.strategy in (Strategy.PLAIN, Strategy.SPECULATIVE)
            for c in chunks
        )

    def _append_emitted(
        self, chunks: list[ScheduledChunk], emitted: list[list[int]], drafts: list[Draft]
    ) -> list[RequestOutput]:
        """``execute``'s tail when the runner's device picked greedy tokens: each sequence's accepted
        drafts and the big model's token after them (just that token without drafts)."""
        outputs = []
        for chunk, tokens, draft in zip(chunks, emitted, drafts, strict=True):
            if not chunk.completes_sequence:
                chunk.seq.num_computed += chunk.num_tokens
            elif draft.tokens:
                outputs.append(self._accept(chunk, draft.tokens, tokens, [None] * len(tokens)))
            else:
                chunk.seq.num_computed += chunk.num_tokens
                outputs.append(self._append(chunk.seq, tokens, [None]))
        return outputs

    def _verify(self, chunk: ScheduledChunk, logits: torch.Tensor, draft: list[int]) -> RequestOutput:
        seq = chunk.seq
        assert self.collab is not None  # drafts come from it
        if seq.strategy is Strategy.BILD:
            emitted, rolled_back = bild_accept(
                logits, draft, seq.params, seq.generator, self.collab.rollback_threshold
            )
            self.counters.rollbacks += rolled_back
        else:
            emitted = verify(logits, draft, seq.params, seq.generator)
        params = [seq.params] * len(emitted)
        return self._accept(chunk, draft, emitted, token_logprobs(logits[: len(emitted)], emitted, params))

    def _accept(
        self,
        chunk: ScheduledChunk,
        draft: list[int],
        emitted: list[int],
        logprobs: list[TokenLogprobs | None],
    ) -> RequestOutput:
        """Book a verification that emitted ``emitted`` (the accepted drafts and one token of the big
        model's) and append them."""
        seq = chunk.seq
        assert self.collab is not None  # drafts come from it
        accepted = len(emitted) - 1
        self.counters.draft_tokens += len(draft)
        self.counters.accepted_draft_tokens += accepted
        if seq.strategy is Strategy.SPECULATIVE:
            assert seq.draft_budget is not None  # set when drafting
            seq.draft_budget = next_draft_budget(seq.draft_budget, len(draft), accepted, self.collab)
        # The last token and the accepted drafts are in the KV cache now; the slots of rejected drafts
        # lie past the sequence's length, so attention never reads them, and later tokens overwrite them.
        seq.num_computed += 1 + accepted
        return self._append(seq, emitted, logprobs)

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
            self._finish(seq, reason)
            del self.sequences[seq.request_id]
        elif (
            seq.strategy is Strategy.GUIDED
            and not seq.on_small_model
            and self.collab is not None
            and len(seq.output_ids) >= self.collab.guided_tokens
        ):
            seq.on_small_model = True
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens[:appended],
            new_text=seq.take_new_text(),
            new_logprobs=logprobs[:appended],
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            route=seq.route,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self.collab is not None:
            self.collab.drafter.release(seq.request_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run prompts to completion; the offline path for scripts and tests."""
        seqs = [self.add_request(p, params) for p in prompts]
        for _ in self.stream():
            pass
        return seqs

    def stream(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()
