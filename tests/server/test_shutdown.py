"""SIGTERM on a real ``ttedge serve`` process: it refuses new requests with 503 at once, lets the
request in flight finish completely, then exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.server.live import assert_error, start_server_process

# Long enough (seconds on the tiny model) that the request is surely still streaming after SIGTERM.
MAX_TOKENS = 1000


def _start(checkpoint: Path) -> tuple[subprocess.Popen[str], str]:
    return start_server_process(
        ["serve", "--model", str(checkpoint), "--weights", "float32", "--port", "0", "--drain-timeout", "60"]
    )


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tiny_chat: Path):
    process, api = _start(tiny_chat)
    base = api.removesuffix("/v1")
    try:
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "prompt": "Story:",
                "max_tokens": MAX_TOKENS,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", f"{api}/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(60)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health").status_code != 503:
            assert time.monotonic() < deadline, "SIGTERM did not start a drain"
            time.sleep(0.02)
        assert httpx.get(f"{base}/health").json() == {"status": "draining"}
        refused = httpx.post(f"{api}/completions", json={"prompt": "late", "max_tokens": 2})
        assert refused.status_code == 503
        assert_error(refused.json(), "server_shutting_down")
        assert process.poll() is None and reader.is_alive(), "the stream ended before the refusal was checked"

        reader.join(120)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == MAX_TOKENS
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.communicate()


def test_serve_steps_the_engine_on_the_thread_that_loaded_the_model(tiny_chat: Path) -> None:
    """``serve.run`` lends its own thread to the engine (one OpenMP team for all torch work) and serves
    HTTP from another; a signal to the process still drains and ends both."""
    from tests.server.live import load_tiny
    from ttedge.config import ServerSettings
    from ttedge.server.serve import build_server, run

    loaded = load_tiny(tiny_chat)
    stepping_threads: set[threading.Thread] = set()
    step = loaded.engine.step

    def recording_step():  # type: ignore[no-untyped-def]
        stepping_threads.add(threading.current_thread())
        return step()

    loaded.engine.step = recording_step  # type: ignore[method-assign]
    answers: list[int] = []

    def client(url: str) -> None:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        answers.append(response.status_code)
        signal.raise_signal(signal.SIGTERM)

    server = build_server(
        loaded,
        ServerSettings(host="127.0.0.1", port=0),
        lambda url: threading.Thread(target=client, args=(url,)).start(),
    )
    assert run(server) is True
    assert answers == [200]
    assert stepping_threads == {threading.current_thread()}
