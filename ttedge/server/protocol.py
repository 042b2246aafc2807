"""OpenAI-compatible request and response bodies.

Limits live on the fields, so validation and the served OpenAPI document say the same thing. Fields
OpenAI defines but ttedge cannot honour accept only their neutral value: a request that relies on them
is refused with a reason (``UNSUPPORTED``) instead of being served as if they were absent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

_INT64 = 2**63

UNSUPPORTED = {
    "n": "ttedge returns one choice per request; send several requests instead",
    "best_of": "ttedge returns one choice per request; send several requests instead",
    "echo": "echoing the prompt is not supported",
    "suffix": "insertion (suffix) is not supported",
    "presence_penalty": "penalties are not supported",
    "frequency_penalty": "penalties are not supported",
    "logit_bias": "logit biases are not supported",
    "tools": "tool calling is not supported",
    "response_format": "only plain-text output is supported",
}

# Stop matching looks for every prefix of every stop string at each token: bounded, that stays cheap.
StopString = Annotated[str, Field(min_length=1, max_length=256)]


def _encodable(text: str) -> str:
    # JSON may spell lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the text holds a lone surrogate at position {error.start}; it is not Unicode"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


StrategyName = Literal["plain", "speculative", "bild", "guided", "routed"]
RouteName = Literal["small", "big"]


class _Strict(BaseModel):
    # JSON types as the schema states them: no "5" for 5, no false for 0.
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class GenerationRequest(_Strict):
    """What completions and chat completions share."""

    # Unknown fields are ignored, as OpenAI clients send newer fields than any server knows.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="The served model (GET /v1/models); omitted = that model.")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy. Default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1 (off).")
    top_k: int | None = Field(
        None, ge=0, le=1_000_000, description="ttedge extension: keep the k most likely tokens; 0 = off."
    )
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64, description="Same seed, same text.")
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = Field(
        None, description="Up to 16 strings; generation stops before the first one produced."
    )
    stream: bool = Field(False, description="Answer with server-sent events, one chunk per token.")
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="ttedge extension (as vLLM): generate past end-of-sequence.")
    strategy: StrategyName | None = Field(
        None,
        description="ttedge extension: big-little strategy for this request (plain, speculative, bild, "
        "guided, routed); omitted = the server's default.",
    )
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")
    n: int | None = Field(None, ge=1, le=1, description=UNSUPPORTED["n"])
    presence_penalty: float | None = Field(None, ge=0, le=0, description=UNSUPPORTED["presence_penalty"])
    frequency_penalty: float | None = Field(None, ge=0, le=0, description=UNSUPPORTED["frequency_penalty"])
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description=UNSUPPORTED["logit_bias"])

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: Text | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        description="Text, or the token ids of one prompt."
    )
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most (default 16).")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Report log-probabilities with this many alternatives per token."
    )
    echo: Literal[False] | None = Field(None, description=UNSUPPORTED["echo"])
    best_of: int | None = Field(None, ge=1, le=1, description=UNSUPPORTED["best_of"])
    suffix: None = Field(None, description=UNSUPPORTED["suffix"])

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and any(isinstance(item, str | list) for item in prompt):
            raise ValueError(
                "a batch of prompts is not supported; send one prompt (text or token ids) per request"
            )
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = Field(None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for index, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {index} has type {kind!r}; only text parts are supported")
        return content

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"] = Field(description=UNSUPPORTED["response_format"])


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; default: up to the context length."
    )
    max_tokens: int | None = Field(None, ge=1, description="Older name of max_completion_tokens.")
    logprobs: bool = Field(False, description="Report the log-probability of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: this many alternatives per token."
    )
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description=UNSUPPORTED["tools"])
    response_format: ResponseFormat | None = None


# ---------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # ttedge extension, on routed requests only: which model answered.
    route: RouteName | None = Field(None, exclude_if=lambda route: route is None)


FinishReasonName = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class CompletionResponse(BaseModel):
    """A whole completion, and also the shape of each streamed chunk (as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ttedge"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
