"""Running the app under uvicorn, with a drain before uvicorn's own graceful shutdown.

On the first SIGTERM (or Ctrl-C) the server keeps listening but answers new requests with 503, so a
load balancer moves traffic elsewhere instead of seeing refused connections; once the requests in
flight have finished (or ``drain_timeout`` passed) uvicorn shuts down as usual. A second signal skips
the rest of the drain.
"""

from __future__ import annotations

import asyncio
import logging
import socket
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
