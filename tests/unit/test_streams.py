"""take_until: a drain stops reading a request stream without losing an item already read."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from relay.streams import take_until


async def test_items_pass_until_stop_is_set() -> None:
    """Every item read before the stop is yielded; the next read is abandoned."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    stop = asyncio.Event()

    async def items() -> AsyncIterator[int]:
        while True:
            yield await queue.get()

    seen: list[int] = []
    done = asyncio.Event()

    async def consume() -> None:
        async for item in take_until(items(), stop):
            seen.append(item)
            if len(seen) == 2:
                done.set()

    consumer = asyncio.create_task(consume())
    queue.put_nowait(1)
    queue.put_nowait(2)
    await done.wait()
    stop.set()
    await asyncio.wait_for(consumer, 5)
    assert [1, 2] == seen


async def test_the_end_of_the_items_ends_it() -> None:
    """A finite stream ends take_until without any stop."""

    async def items() -> AsyncIterator[int]:
        for item in range(3):
            yield item

    assert [0, 1, 2] == [item async for item in take_until(items(), asyncio.Event())]


async def test_a_stop_set_before_the_first_read_yields_nothing() -> None:
    """A stream drained before it started reads nothing."""
    stop = asyncio.Event()
    stop.set()

    async def items() -> AsyncIterator[int]:
        yield 1

    assert [] == [item async for item in take_until(items(), stop)]


async def test_a_consumer_that_goes_away_leaves_no_read_pending() -> None:
    """Closing take_until while it waits for an item cancels that read."""
    reading = asyncio.Event()
    finished: list[str] = []

    async def items() -> AsyncIterator[int]:
        reading.set()
        try:
            await asyncio.Event().wait()
            yield 1
        finally:
            finished.append("read cancelled")

    taken = take_until(items(), asyncio.Event())
    consumer = asyncio.create_task(anext(taken))
    await reading.wait()
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    await taken.aclose()
    assert ["read cancelled"] == finished
