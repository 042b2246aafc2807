"""OpenAI response bodies and stream chunks from engine outputs: one renderer per endpoint."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from pydantic import BaseModel

from ttedge.engine.engine import RequestOutput
from ttedge.engine.sampling import TokenLogprobs
from ttedge.engine.sequence import FinishReason
from ttedge.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FinishReasonName,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ttedge.tokenizer import Tokenizer

_FINISH_REASONS: dict[FinishReason, FinishReasonName] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}


class Renderer(ABC):
    """Accumulates one request's outputs; hands out stream chunks as they come and the whole at the end."""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, logprobs: bool):
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.finish_reason: FinishReasonName | None = None
        self.usage: Usage | None = None
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._text: list[str] = []
        self._scored: list[tuple[int, TokenLogprobs]] = []

    def add(self, output: RequestOutput) -> BaseModel | None:
        """Take the next output; returns the stream chunk it makes, or None when it adds nothing visible
        (text held back until a character or a possible stop string is complete)."""
        self._text.append(output.new_text)
        scored = [
            (t, lp) for t, lp in zip(output.new_token_ids, output.new_logprobs, strict=True) if lp is not None
        ]
        self._scored += scored
        if output.finished:
            self.finish_reason = _FINISH_REASONS.get(output.finish_reason or FinishReason.STOP, "stop")
            self.usage = Usage(
                prompt_tokens=output.num_prompt_tokens,
                completion_tokens=output.num_output_tokens,
                total_tokens=output.num_prompt_tokens + output.num_output_tokens,
                route=None if output.route is None else output.route.value,
            )
        if not (output.new_text or scored or output.finished):
            return None
        return self._chunk(output.new_text, scored)

    @property
    def text(self) -> str:
        return "".join(self._text)

    def opening_chunks(self) -> list[BaseModel]:
        """Chunks sent as soon as the request is admitted, before any token."""
        return []

    @abstractmethod
    def _chunk(self, text: str, scored: list[tuple[int, TokenLogprobs]]) -> BaseModel: ...

    @abstractmethod
    def usage_chunk(self) -> BaseModel: ...

    @abstractmethod
    def response(self) -> BaseModel: ...

    def _token_text(self, token_id: int) -> str:
        # Special tokens are spelled out: a log-probability report names every token that was scored.
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


class CompletionRenderer(Renderer):
    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, logprobs: bool):
        super().__init__(request_id, model, tokenizer, logprobs)
        self._streamed_offset = 0  # text offset of the next token's log-probabilities in a stream

    def _chunk(self, text: str, scored: list[tuple[int, TokenLogprobs]]) -> BaseModel:
        body = self._body(text, scored, self._streamed_offset, usage=None)
        self._streamed_offset += sum(len(self._token_text(token_id)) for token_id, _ in scored)
        return body

    def usage_chunk(self) -> BaseModel:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage
        )

    def response(self) -> BaseModel:
        return self._body(self.text, self._scored, 0, usage=self.usage)

    def _body(
        self, text: str, scored: list[tuple[int, TokenLogprobs]], offset: int, usage: Usage | None
    ) -> BaseModel:
        choice = CompletionChoice(
            text=text,
            logprobs=self._logprobs_of(scored, offset) if self._logprobs else None,
            finish_reason=self.finish_reason,
        )
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[choice], usage=usage
        )

    def _logprobs_of(self, scored: list[tuple[int, TokenLogprobs]], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token_id, logprobs in scored:
            token = self._token_text(token_id)
            result.tokens.append(token)
            result.token_logprobs.append(logprobs.token_logprob)
            result.top_logprobs.append({self._token_text(i): value for i, value in logprobs.top})
            result.text_offset.append(offset)
            offset += len(token)
        return result


class ChatRenderer(Renderer):
    def opening_chunks(self) -> list[BaseModel]:
        return [self._delta(ChatDelta(role="assistant", content=""), [])]

    def _chunk(self, text: str, scored: list[tuple[int, TokenLogprobs]]) -> BaseModel:
        return self._delta(ChatDelta(content=text), scored)

    def usage_chunk(self) -> BaseModel:
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[], usage=self.usage
        )

    def response(self) -> BaseModel:
        assert self.finish_reason is not None and self.usage is not None, "the request has not finished"
        choice = ChatChoice(
            message=AssistantMessage(content=self.text),
            logprobs=self._logprobs_of(self._scored) if self._logprobs else None,
            finish_reason=self.finish_reason,
        )
        return ChatCompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=[choice], usage=self.usage
        )

    def _delta(self, delta: ChatDelta, scored: list[tuple[int, TokenLogprobs]]) -> BaseModel:
        choice = ChatChunkChoice(
            delta=delta,
            logprobs=self._logprobs_of(scored) if self._logprobs and scored else None,
            finish_reason=self.finish_reason,
        )
        return ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=[choice]
        )

    def _logprobs_of(self, scored: list[tuple[int, TokenLogprobs]]) -> ChatLogprobs:
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **self._scored_token(token_id, logprobs.token_logprob).model_dump(),
                    top_logprobs=[self._scored_token(i, value) for i, value in logprobs.top],
                )
                for token_id, logprobs in scored
            ]
        )

    def _scored_token(self, token_id: int, logprob: float) -> TopLogprob:
        token = self._token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
