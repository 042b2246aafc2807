"""Every limit answers with its status and OpenAI's error shape, naming the problem; never a 5xx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.live import LiveServer, assert_error, load_tiny
from ttedge.config import ServerSettings

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def strict(tiny_chat: Path) -> Iterator[LiveServer]:
    """API key, 2 running + 1 queued requests, bodies up to 4 KiB."""
    loaded = load_tiny(tiny_chat, max_num_seqs=2, max_queue_len=1)
    with LiveServer(loaded, ServerSettings(api_key=KEY, max_body_bytes=4096)) as live:
        yield live


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": "x", "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"prompt": "x", "temperature": False}, "temperature", "valid number"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"prompt": "x", "stop": ["a"] * 17}, "stop", "at most 16"),
        ({"prompt": "x", "stop": [""]}, "stop[0]", "at least 1 character"),
        ({"prompt": "x", "n": 2}, "n", "one choice per request"),
        ({"prompt": "x", "echo": True}, "echo", "echoing the prompt is not supported"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "penalties are not supported"),
        ({"prompt": "x", "seed": 2**64}, "seed", "less than"),
        ({"prompt": ["a", "b"]}, "prompt", "a batch of prompts is not supported"),
        ({"prompt": [1, -5]}, "prompt[1]", "greater than or equal to 0"),
        ({"prompt": []}, "prompt", "at least 1 item"),
        ([1, 2], None, "valid dictionary"),
    ],
)
def test_malformed_completion_requests_get_400_naming_the_field(
    server: LiveServer, body: object, param: str | None, says: str
):
    response = httpx.post(f"{server.api}/completions", json=body)
    assert response.status_code == 400
    message = assert_error(response.json(), "invalid_value", param)
    assert says in message


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'system'"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "Field required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
            "only text parts are supported",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "logprobs: true",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "tool"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format.type",
            "plain-text",
        ),
    ],
)
def test_malformed_chat_requests_get_400_naming_the_field(
    server: LiveServer, body: dict, param: str, says: str
):
    response = httpx.post(f"{server.api}/chat/completions", json=body)
    assert response.status_code == 400
    assert says in assert_error(response.json(), "invalid_value", param)


def test_invalid_json_gets_400(server: LiveServer):
    response = httpx.post(
        f"{server.api}/completions", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in assert_error(response.json(), "invalid_json")


def test_text_that_is_not_unicode_gets_400(server: LiveServer):
    headers = {"Content-Type": "application/json"}
    body = b'{"prompt": "a \\ud800 b"}'  # a lone surrogate: valid JSON, invalid Unicode
    response = httpx.post(f"{server.api}/completions", content=body, headers=headers)
    assert response.status_code == 400
    assert "lone surrogate" in assert_error(response.json(), "invalid_value", "prompt")
    body = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
    response = httpx.post(f"{server.api}/chat/completions", content=body, headers=headers)
    assert response.status_code == 400
    assert_error(response.json(), "invalid_value", "messages[0].content[0].text")


def test_unparsable_body_gets_400(server: LiveServer):
    # Nesting deeper than Python's JSON parser recurses.
    response = httpx.post(
        f"{server.api}/completions", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert_error(response.json(), "invalid_json")


def test_prompt_plus_max_tokens_beyond_the_context_gets_400_with_the_numbers(server: LiveServer):
    prompt = [5] * 2000
    response = httpx.post(f"{server.api}/completions", json={"prompt": prompt, "max_tokens": 100})
    assert response.status_code == 400
    message = assert_error(response.json(), "context_length_exceeded", "max_tokens")
    assert all(str(n) in message for n in (2048, 2100, 2000, 100))
    response = httpx.post(f"{server.api}/completions", json={"prompt": [5] * 2048, "max_tokens": 1})
    assert "2048 tokens" in assert_error(response.json(), "context_length_exceeded", "prompt")
    chat = {"messages": [{"role": "user", "content": "hi " * 3000}]}
    response = httpx.post(f"{server.api}/chat/completions", json=chat)
    assert response.status_code == 400
    assert_error(response.json(), "context_length_exceeded", "messages")


def test_token_ids_outside_the_vocabulary_get_400(server: LiveServer):
    response = httpx.post(f"{server.api}/completions", json={"prompt": [1, 10**9], "max_tokens": 1})
    assert response.status_code == 400
    assert "49152" in assert_error(response.json(), "invalid_prompt")


def test_unknown_model_gets_404(server: LiveServer):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    response = httpx.post(f"{server.api}/chat/completions", json=body)
    assert response.status_code == 404
    assert "tiny-chat" in assert_error(response.json(), "model_not_found", "model")
    assert httpx.get(f"{server.api}/models/gpt-4o").status_code == 404


def test_unknown_route_and_wrong_method_use_the_error_shape(server: LiveServer):
    response = httpx.get(f"{server.api}/embeddings")
    assert response.status_code == 404
    assert "/v1/embeddings" in assert_error(response.json(), "not_found")
    response = httpx.get(f"{server.api}/completions")
    assert response.status_code == 405
    assert_error(response.json(), "method_not_allowed")


def test_api_key_is_required_on_v1_routes(strict: LiveServer):
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(f"{strict.api}/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert_error(response.json(), "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{strict.api}/completions", json=body, headers=AUTH).status_code == 200
    assert httpx.get(f"{strict.url}/health").status_code == 200
    assert httpx.get(f"{strict.url}/metrics").status_code == 200


def test_oversized_body_gets_413(strict: LiveServer):
    response = httpx.post(f"{strict.api}/completions", json={"prompt": "x" * 5000}, headers=AUTH)
    assert response.status_code == 413
    assert "4096 bytes" in assert_error(response.json(), "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    response = httpx.post(f"{strict.api}/completions", content=chunked(), headers=AUTH)
    assert response.status_code == 413


def test_full_queue_gets_429_with_retry_after(strict: LiveServer):
    asyncio.run(_fill_the_queue_then_ask(strict))
    strict.wait_engine_idle()
    response = httpx.post(f"{strict.api}/completions", json={"prompt": "x", "max_tokens": 1}, headers=AUTH)
    assert response.status_code == 200


async def _fill_the_queue_then_ask(strict: LiveServer) -> None:
    body = {"prompt": "x", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=strict.api, headers=AUTH, timeout=30) as client:
        # 2 running + 1 queued fill the server; each stream is admitted once its status line arrives.
        streams = [await client.send(client.build_request("POST", "/completions", json=body), stream=True)]
        streams += [await client.send(client.build_request("POST", "/completions", json=body), stream=True)]
        streams += [await client.send(client.build_request("POST", "/completions", json=body), stream=True)]
        assert [s.status_code for s in streams] == [200, 200, 200]
        refused = await client.post("/completions", json={"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert "3 requests are in flight" in assert_error(refused.json(), "queue_full")
        for stream in streams:
            await stream.aclose()
