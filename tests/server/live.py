"""Servers for the tests: the real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import dataclasses
import re
import selectors
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.config import EngineSettings, ServerSettings
from ttedge.server.app import Service
from ttedge.server.serve import DrainingServer, build_server


def load_tiny(checkpoint: Path, **settings: object) -> LoadedEngine:
    # 16 MiB of KV cache hold 65536 tokens of the tiny model: ample, and light on memory.
    settings = {"weight_format": "float32", "kv_cache_mb": 16, **settings}
    return load_engine(EngineSettings(model=str(checkpoint), **settings))  # type: ignore[arg-type]


class LiveServer:
    def __init__(self, loaded: LoadedEngine, settings: ServerSettings | None = None):
        settings = dataclasses.replace(settings or ServerSettings(), host="127.0.0.1", port=0)
        self.url = ""
        self._ready = threading.Event()
        self.server: DrainingServer = build_server(loaded, settings, self._on_ready)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def service(self) -> Service:
        return self.server.service

    @property
    def api(self) -> str:
        return f"{self.url}/v1"

    def _on_ready(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the server did not start within 60 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def wait_engine_idle(self, timeout: float = 10.0) -> float:
        """Seconds until no sequence holds a KV block or a batch slot; fails after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            stats = self.service.engine.stats
            if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
                return time.monotonic() - started
            time.sleep(0.01)
        raise AssertionError(f"the engine is still busy after {timeout} s: {self.service.engine.stats}")


def metric(server: LiveServer, sample: str) -> float:
    """The value of one sample on ``/metrics`` (a name with its labels); 0 while it has not appeared."""
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_error(body: dict, code: str, param: str | None = None) -> str:
    """Checks OpenAI's error shape and the code (and param); returns the message."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"], error
    return error["message"]


def start_server_process(ttedge_args: list[str], timeout: float = 120) -> tuple[subprocess.Popen[str], str]:
    """``ttedge ARGS`` (a serve, or a launch of one) in a child process; returns it and its API URL once
    it prints that it is serving."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ttedge.cli", *ttedge_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and selector.select(timeout=deadline - time.monotonic()):
        line = process.stdout.readline()
        if not line:
            break
        if match := re.search(r"at (http://\S+/v1)$", line.strip()):
            return process, match.group(1)
    process.kill()
    raise AssertionError(f"the server did not come up: {process.communicate()}")
