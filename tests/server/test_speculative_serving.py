"""Speculative decoding behind the API: several tokens per engine step reach the client in order, the
text equals plain decoding's, and /metrics counts drafts and acceptances."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.server.live import LiveServer, load_tiny, metric

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
    with LiveServer(load_tiny(tiny_chat, speculative="prompt-lookup", num_draft_tokens=4)) as server:
        whole = httpx.post(f"{server.api}/completions", json=BODY, timeout=60).json()
        assert whole["choices"][0]["text"] == expected
        assert whole["usage"]["completion_tokens"] == 120
        assert stream_text(server) == expected
        drafted = metric(server, "ttedge_spec_draft_tokens_total")
        accepted = metric(server, "ttedge_spec_accepted_tokens_total")
        assert 0 < accepted <= drafted
        server.wait_engine_idle()
