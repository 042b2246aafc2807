"""Big–little strategies behind the API: several tokens per engine step reach the client in order, the
text equals plain decoding's, requests pick their strategy, routed responses say which model answered,
and /metrics counts drafts, acceptances, rollbacks and routes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.server.live import LiveServer, assert_error, load_tiny, metric

# Token ids after which the tiny random model falls into loops that prompt lookup can draft.
BODY = {"prompt": list(range(100, 110)), "max_tokens": 120, "temperature": 0, "ignore_eos": True}


def stream_text(server: LiveServer) -> str:
    pieces = []
    with httpx.stream("POST", f"{server.api}/completions", json={**BODY, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(pieces)


def test_speculative_server_streams_the_plain_text_and_counts_acceptances(tiny_chat: Path):
    with LiveServer(load_tiny(tiny_chat)) as plain:
        expected = httpx.post(f"{plain.api}/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    with LiveServer(load_tiny(tiny_chat, draft="prompt-lookup", num_draft_tokens=4)) as server:
        whole = httpx.post(f"{server.api}/completions", json=BODY, timeout=60).json()
        assert whole["choices"][0]["text"] == expected
        assert whole["usage"]["completion_tokens"] == 120
        assert stream_text(server) == expected
        drafted = metric(server, "ttedge_spec_draft_tokens_total")
        accepted = metric(server, "ttedge_spec_accepted_tokens_total")
        assert 0 < accepted <= drafted
        server.wait_engine_idle()


def test_requests_pick_a_strategy_and_routed_answers_name_their_model(tiny_chat: Path):
    with LiveServer(load_tiny(tiny_chat, draft="self:0")) as server:
        greedy_plain = {**BODY, "max_tokens": 24, "strategy": "plain"}
        plain = httpx.post(f"{server.api}/completions", json=greedy_plain, timeout=60).json()
        speculative = httpx.post(
            f"{server.api}/completions", json={**greedy_plain, "strategy": None}, timeout=60
        )
        assert speculative.json()["choices"][0]["text"] == plain["choices"][0]["text"]
        assert "route" not in plain["usage"]
        routed = {**greedy_plain, "strategy": "routed"}
        answer = httpx.post(f"{server.api}/completions", json=routed, timeout=60).json()
        assert answer["usage"]["route"] in ("small", "big")
        routes = metric(server, 'ttedge_routed_requests_total{model="small"}') + metric(
            server, 'ttedge_routed_requests_total{model="big"}'
        )
        assert routes == 1
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "strategy": "bild"}
        assert httpx.post(f"{server.api}/chat/completions", json=chat, timeout=60).status_code == 200
        bogus = httpx.post(f"{server.api}/completions", json={**BODY, "strategy": "oracle"}, timeout=60)
        assert bogus.status_code == 400
        server.wait_engine_idle()
    with LiveServer(load_tiny(tiny_chat, draft="prompt-lookup")) as lookup:
        refused = httpx.post(f"{lookup.api}/completions", json={**BODY, "strategy": "guided"}, timeout=60)
        assert refused.status_code == 400
        assert "needs a small model" in assert_error(refused.json(), "invalid_value", param="strategy")
