"""The bridge between the synchronous engine and asyncio, without HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from tests.server.live import load_tiny
from ttedge.engine.sampling import SamplingParams
from ttedge.server.async_engine import AsyncEngine, EngineStopped

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)


def test_outputs_stream_in_order_and_an_idle_engine_thread_sleeps(tiny_chat: Path):
    bridge = AsyncEngine(load_tiny(tiny_chat).engine)
    bridge.start()
    try:

        async def generate() -> list[int]:
            stream = await bridge.submit([5, 6, 7], GREEDY, "a")
            return [timed.output.num_output_tokens async for timed in stream]

        assert asyncio.run(generate()) == [1, 2, 3, 4]
        assert bridge._thread is not None
        native_id = bridge._thread.native_id

        def cpu_seconds() -> float:
            thread = next(t for t in psutil.Process().threads() if t.id == native_id)
            return thread.user_time + thread.system_time

        before = cpu_seconds()
        time.sleep(0.5)
        assert cpu_seconds() - before < 0.02
    finally:
        bridge.stop()


def test_stop_fails_requests_in_flight_and_the_engine_can_start_again(tiny_chat: Path):
    loaded = load_tiny(tiny_chat)
    bridge = AsyncEngine(loaded.engine)
    bridge.start()

    async def interrupted() -> None:
        stream = await bridge.submit([5, 6, 7], LONG, "long")
        await anext(stream)
        await asyncio.to_thread(bridge.stop)
        with pytest.raises(EngineStopped):
            async for _ in stream:
                pass
        with pytest.raises(EngineStopped):
            await bridge.submit([5], GREEDY, "late")

    asyncio.run(interrupted())
    assert loaded.engine.stats().kv_blocks_used == 0 and not loaded.engine.has_unfinished()
    bridge.start()
    try:

        async def again() -> bool:
            stream = await bridge.submit([5], GREEDY, "again")
            return [timed async for timed in stream][-1].output.finished

        assert asyncio.run(again())
    finally:
        bridge.stop()
