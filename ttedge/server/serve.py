"""Running the app under uvicorn, with a drain before uvicorn's own graceful shutdown.

On the first SIGTERM (or Ctrl-C) the server keeps listening but answers new requests with 503, so a
load balancer moves traffic elsewhere instead of seeing refused connections; once the requests in
flight have finished (or ``drain_timeout`` passed) uvicorn shuts down as usual. A second signal skips
the rest of the drain.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from ttedge.bootstrap import LoadedEngine
from ttedge.config import ServerSettings
from ttedge.server.app import Service, create_app

log = logging.getLogger(__name__)

# Once drained, the connections left only have their last bytes to write.
_FLUSH_SECONDS = 5


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, on_ready: Callable[[str], None]):
        super().__init__(config)
        self.service = service
        self._on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        sockname = self.servers[0].sockets[0].getsockname()
        host, port = sockname[0], sockname[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._loop = asyncio.get_running_loop()
        if self.started:
            self._on_ready(self.url)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Set here, in the signal handler, so that no request is admitted after the signal.
        self.service.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.service.drain()
        self.should_exit = True


def build_server(
    loaded: LoadedEngine,
    settings: ServerSettings,
    on_ready: Callable[[str], None],
    log_level: str = "warning",
) -> DrainingServer:
    app = create_app(loaded, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=_FLUSH_SECONDS,
    )
    return DrainingServer(config, app.state.service, on_ready)


def run(server: DrainingServer) -> bool:
    """Serve until shut down, with the engine stepping on this thread and uvicorn on another. Returns
    whether the server started (uvicorn has logged why not).

    Call it from the thread that loaded the model (the main thread). torch's OpenMP runtime keeps a
    team of worker threads for each thread that starts parallel work; a model loaded on one thread and
    stepped on another makes two teams, more threads than a small machine's cores, and OpenMP then
    parks its workers between parallel regions instead of spinning, so each of the thousands of small
    ops per step pays a wake-up (batch-1 decode on 2 cores: 26 tok/s instead of 47). Signals reach
    this thread and start the drain as they would under uvicorn's own handlers.
    """
    engine = server.service.engine

    def serve_http() -> None:
        try:
            server.run()
        finally:
            engine.request_stop()  # also when uvicorn could not start (a port in use)

    http = threading.Thread(target=serve_http, name="uvicorn")
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    try:
        engine.run_here(on_started=http.start)
    finally:
        server.should_exit = True  # the engine loop ended first only if it died: take the server down
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.started
