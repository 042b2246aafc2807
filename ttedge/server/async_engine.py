"""The synchronous engine behind asyncio: one thread owns and steps it, handlers talk to it by message.

Request handlers never touch the engine. They post adds and aborts to an inbox; the engine thread
applies them between steps, so the engine stays single-threaded as it was written. Each request's
outputs go back to the event loop that submitted it through ``loop.call_soon_threadsafe`` onto an
``asyncio.Queue``. When nothing is in flight the thread sleeps on a condition variable.

The engine's thread is either its own (``start``) or one the caller lends it (``run_here``): ``ttedge
serve`` lends the main thread, which loaded the model, so that every torch op runs on one thread (see
``serve.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ttedge.collab.strategies import Strategy
from ttedge.engine.engine import Engine, EngineStats, RequestOutput
from ttedge.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

# An idle engine loop still wakes this often. On the main thread (``run_here``) Python runs signal
# handlers only between bytecodes, and a signal delivered to another thread does not interrupt a
# blocked wait: without the wake-up, a SIGTERM to an idle server would wait for the next request.
_IDLE_WAKE_SECONDS = 0.2


class EngineFailure(RuntimeError):
    """The engine failed while this request was in flight; the request was abandoned."""


class EngineStopped(RuntimeError):
    """The engine thread is stopping or has stopped; it takes no more requests."""


@dataclass(frozen=True)
class TimedOutput:
    output: RequestOutput
    time: float  # time.monotonic() when the step that produced the output returned


class RequestStream:
    """One request's outputs in order, ending after the finished one; an engine failure is raised."""

    def __init__(self, request_id: str, bridge: AsyncEngine):
        self.request_id = request_id
        self.finished = False
        self._bridge = bridge
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TimedOutput | BaseException] = asyncio.Queue()
        self._admitted: asyncio.Future[None] = self._loop.create_future()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TimedOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.output.finished
        return item

    def abort(self) -> None:
        """Stop generating (the client went away); the engine frees the sequence's KV blocks."""
        if not self.finished:
            self.finished = True
            self._bridge.abort(self.request_id)

    # Called on the engine thread: hand over to the stream's loop. False when that loop is gone.
    def _deliver(self, item: TimedOutput | BaseException) -> bool:
        return self._call(self._queue.put_nowait, item)

    def _resolve(self, error: BaseException | None) -> bool:
        return self._call(_settle, self._admitted, error)

    def _call(self, function: Callable[..., object], *args: object) -> bool:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the submitter was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


@dataclass(frozen=True)
class _Add:
    stream: RequestStream
    prompt_ids: list[int]
    params: SamplingParams
    strategy: Strategy | None


@dataclass(frozen=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine):
        self._engine = engine
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop_ended = threading.Event()  # set whenever the engine loop is not running
        self._loop_ended.set()
        # Owned by the engine thread.
        self._active: dict[str, RequestStream] = {}
        # Set while nothing is in flight or posted; lets a drain wait without polling.
        self._idle = threading.Event()
        self._idle.set()
        # Replaced (never mutated) by the engine thread after each round, so readers need no lock.
        self.stats: EngineStats = engine.stats()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the engine thread; again after ``stop`` too (an ASGI app's lifespan may run repeatedly)."""
        if self.running:
            return
        with self._cond:
            self._stopping = False
        self._loop_ended.clear()
        # Daemon: a server that forgot to stop must not keep the interpreter alive at exit.
        self._thread = threading.Thread(target=self._run, name="ttedge-engine", daemon=True)
        self._thread.start()

    def run_here(self, on_started: Callable[[], None] = lambda: None) -> None:
        """Run the engine loop on the calling thread until ``stop``; ``start`` is then a no-op.
        ``on_started`` runs once the loop owns the thread (start the HTTP server there)."""
        with self._cond:
            self._stopping = False
        self._loop_ended.clear()
        self._thread = threading.current_thread()
        on_started()
        self._run()

    def request_stop(self) -> None:
        """Make the engine loop end after the step it is in, without waiting for it."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self) -> None:
        """Fail whatever is still in flight and end the engine loop (after the step it is in)."""
        self.request_stop()
        if self._thread is not threading.current_thread():
            self._loop_ended.wait()

    async def submit(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, strategy: Strategy | None = None
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises the engine's refusal
        (``RequestRejected``, ``QueueFull``) or ``EngineStopped``."""
        stream = RequestStream(request_id, self)
        self._post(_Add(stream, list(prompt_ids), params, strategy))
        try:
            await stream._admitted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        # A stopping engine fails and frees every request anyway.
        with contextlib.suppress(EngineStopped):
            self._post(_Abort(request_id))

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` seconds passed first."""
        return await asyncio.to_thread(self._idle.wait, timeout)

    def _post(self, command: _Add | _Abort) -> None:
        with self._cond:
            if not self.running:
                raise EngineStopped("the engine is not running")
            self._inbox.append(command)
            self._idle.clear()
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            # A bug outside a step (a step's own failure is handled there): fail loudly, not silently hang.
            log.exception("the engine thread died")
            with self._cond:
                self._stopping = True
                commands, self._inbox = self._inbox, []
            self._shut(commands, EngineFailure("the engine thread died"))
        finally:
            self._loop_ended.set()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._active or self._stopping):
                    self._idle.set()
                    self._cond.wait(_IDLE_WAKE_SECONDS)
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            if stopping:
                self._shut(commands, EngineStopped("the server shut down before the request finished"))
                return
            for command in commands:
                if isinstance(command, _Add):
                    self._add(command)
                else:
                    self._abort(command.request_id)
            if self._engine.has_unfinished():
                self._step()
            self.stats = self._engine.stats()

    def _add(self, command: _Add) -> None:
        stream = command.stream
        try:
            self._engine.add_request(command.prompt_ids, command.params, stream.request_id, command.strategy)
        except Exception as error:  # refusals go back to the handler, which maps them to HTTP statuses
            stream._resolve(error)
            return
        self._active[stream.request_id] = stream
        if not stream._resolve(None):
            self._abort(stream.request_id)

    def _abort(self, request_id: str) -> None:
        self._active.pop(request_id, None)
        self._engine.abort(request_id)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception:
            # What the failed step left in its sequences' state is undefined, and which sequences it
            # touched is the scheduler's business: abandon everything in flight and keep serving.
            log.exception("engine step failed; failing %d requests in flight", len(self._active))
            self._fail_all(EngineFailure("the engine failed while generating this response"))
            return
        now = time.monotonic()
        for output in outputs:
            stream = self._active.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                del self._active[output.request_id]
            if not stream._deliver(TimedOutput(output, now)):
                self._abort(output.request_id)

    def _shut(self, pending: list[_Add | _Abort], error: BaseException) -> None:
        for command in pending:
            if isinstance(command, _Add):
                command.stream._resolve(EngineStopped("the server is shutting down"))
        self._fail_all(error)
        self._idle.set()

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._active.items()):
            try:
                self._engine.abort(request_id)
            except Exception:
                log.exception("aborting %s after an engine failure failed", request_id)
            stream._deliver(error)
        self._active.clear()
