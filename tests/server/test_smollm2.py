"""The real SmolLM2-135M-Instruct behind the server, through the official ``openai`` client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.server.live import LiveServer
from ttedge.bootstrap import load_engine
from ttedge.config import EngineSettings

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    # float32: the golden weights, whose answers match transformers token for token.
    with LiveServer(load_engine(EngineSettings(weight_format="float32"))) as live:
        yield openai.OpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=120)


def test_chat_answers_and_streams_the_same_answer(client: openai.OpenAI):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12, temperature=0)
    assert "Paris" in (whole.choices[0].message.content or "")
    stream = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=12, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == whole.choices[0].message.content
    )


def test_completion_stops_before_the_stop_string(client: openai.OpenAI):
    response = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0, stop=["8"]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text.replace(" ", "") == "6,7,"


def test_seeded_sampling_reproduces_and_logprobs_are_reported(client: openai.OpenAI):
    def ask(seed: int) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Name a colour."}],
            max_completion_tokens=8,
            temperature=0.9,
            seed=seed,
            logprobs=True,
            top_logprobs=2,
        )

    first, again = ask(11), ask(11)
    assert first.choices[0].message.content == again.choices[0].message.content
    content = first.choices[0].logprobs.content
    assert len(content) == first.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
