"""The OpenAI-compatible API over loopback with the official ``openai`` client, on a tiny random model.

The model's text is noise, but greedy and seeded decoding are deterministic, which is what these tests
compare: streamed against whole, token ids against text, one seed against itself.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.live import LiveServer, assert_error, metric

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI, server: LiveServer):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.owned_by == "ttedge"
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.api}/models").json()["data"][0]["max_model_len"] == 2048


def test_completion_greedy_is_deterministic_and_counts_tokens(client: openai.OpenAI):
    first = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    choice = first.choices[0]
    assert first.object == "text_completion" and first.model == MODEL
    assert choice.finish_reason == "length" and choice.text
    assert first.usage is not None and first.usage.completion_tokens == 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12
    assert again.choices[0].text == choice.text


def test_token_id_prompt_equals_text_prompt(client: openai.OpenAI, server: LiveServer):
    ids = server.service.tokenizer.encode("The weather today")
    by_text = client.completions.create(model=MODEL, prompt="The weather today", max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_default_completion_length_is_16_as_openai(client: openai.OpenAI):
    response = client.completions.create(
        model=MODEL, prompt="Hi", temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage is not None and response.usage.completion_tokens == 16


def test_seed_reproduces_sampled_text(client: openai.OpenAI):
    def sample(seed: int) -> str:
        response = client.completions.create(
            model=MODEL, prompt="Tell me", max_tokens=16, temperature=1.0, top_p=0.9, seed=seed
        )
        return response.choices[0].text

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_extension_is_accepted(client: openai.OpenAI):
    greedy = client.completions.create(model=MODEL, prompt="x y", max_tokens=6, temperature=0)
    top1 = client.completions.create(model=MODEL, prompt="x y", max_tokens=6, extra_body={"top_k": 1}, seed=3)
    assert top1.choices[0].text == greedy.choices[0].text


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI):
    full = (
        client.completions.create(model=MODEL, prompt="A list:", max_tokens=24, temperature=0).choices[0].text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = client.completions.create(
        model=MODEL, prompt="A list:", max_tokens=24, temperature=0, stop=[stop, "@@"]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_completion_logprobs(client: openai.OpenAI):
    response = client.completions.create(
        model=MODEL, prompt="Numbers:", max_tokens=5, temperature=0, logprobs=3
    )
    logprobs = response.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs or []) == 5
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for chosen, top in zip(logprobs.token_logprobs or [], logprobs.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        # Greedy picks the most likely token, so its log-probability is the best of the alternatives.
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)


def test_chat_completion_and_its_stream_agree(client: openai.OpenAI):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_logprobs_and_text_parts(client: openai.OpenAI):
    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
        ],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes) == entry.token.encode()


def test_completion_stream_ends_with_done(server: LiveServer):
    body = {"model": MODEL, "prompt": "Go", "max_tokens": 6, "stream": True, "temperature": 0, "logprobs": 1}
    with httpx.stream("POST", f"{server.api}/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    tokens = [token for c in chunks for token in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [offset for c in chunks for offset in c["choices"][0]["logprobs"]["text_offset"]]
    assert len(tokens) == 6
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]  # continued across chunks
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_openai_client_raises_on_error_responses(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert bad.value.param == "n" and "one choice" in bad.value.message


def test_client_disconnect_mid_stream_frees_the_sequence_at_once(server: LiveServer):
    server.wait_engine_idle()
    aborted = metric(server, 'ttedge_requests_finished_total{finish_reason="abort"}')
    body = {"prompt": "Long story", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.api}/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert server.service.engine.stats.kv_blocks_used > 0
        left = time.monotonic()
    # 1900 tokens take seconds; the sequence must be gone long before.
    assert server.wait_engine_idle(timeout=3.0) < 2.0, time.monotonic() - left
    assert metric(server, 'ttedge_requests_finished_total{finish_reason="abort"}') == aborted + 1


def test_client_giving_up_on_a_whole_response_frees_the_sequence(server: LiveServer):
    server.wait_engine_idle()
    body = {"prompt": "Long story", "max_tokens": 1900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.api}/completions", json=body, timeout=0.5)
    assert server.wait_engine_idle(timeout=2.0) < 1.5


def test_engine_failure_fails_requests_with_500_and_the_server_recovers(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
):
    server.wait_engine_idle()
    runner = server.service.engine._engine.runner

    def broken(inputs: object) -> object:
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(runner, "run", broken)
    response = httpx.post(f"{server.api}/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
    assert response.status_code == 500
    assert_error(response.json(), "engine_error")
    with httpx.stream("POST", f"{server.api}/completions", json={"prompt": "x", "stream": True}) as stream:
        assert stream.status_code == 200
        lines = [line for line in stream.iter_lines() if line]
    assert_error(json.loads(lines[-2].removeprefix("data: ")), "engine_error")
    assert lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    server.wait_engine_idle()
    assert httpx.post(f"{server.api}/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_metrics_report_latencies_tokens_and_engine_state(server: LiveServer):
    httpx.post(f"{server.api}/completions", json={"prompt": "count", "max_tokens": 3}, timeout=30)
    httpx.post(f"{server.api}/completions", json={"prompt": "count", "temperature": 5}, timeout=30)
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "ttedge_time_to_first_token_seconds_bucket",
        "ttedge_inter_token_latency_seconds_bucket",
        "ttedge_e2e_request_latency_seconds_count",
        "ttedge_requests_waiting",
        "ttedge_requests_running",
        "ttedge_kv_cache_blocks_used",
        "ttedge_kv_cache_blocks_total",
        "ttedge_spec_draft_tokens_total",
        "ttedge_spec_accepted_tokens_total",
        "ttedge_bild_fallbacks_total",
        "ttedge_bild_rollbacks_total",
        'ttedge_routed_requests_total{model="small"}',
        'ttedge_routed_requests_total{model="big"}',
        "ttedge_small_model_tokens_total",
        "ttedge_prompt_tokens_total",
        "ttedge_generation_tokens_total",
        'ttedge_requests_finished_total{finish_reason="length"}',
        'ttedge_requests_rejected_total{reason="invalid_value"}',
    ):
        assert name in text, name
    assert metric(server, "ttedge_generation_tokens_total") >= 3
    assert metric(server, "ttedge_kv_cache_blocks_total") == server.service.engine.stats.kv_blocks_total


def test_openapi_schema_documents_the_limits(server: LiveServer):
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["logprobs"]["anyOf"][0]["maximum"] == 20
    assert fields["n"]["anyOf"][0]["maximum"] == 1
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "429", "503"} <= set(responses)
