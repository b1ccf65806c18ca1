"""Bounded, out-of-order work over a request stream, with backpressure.

`bounded_map` reads the next request only while fewer than `concurrency` items are in
progress or waiting to be sent, so a fast producer is held back by gRPC flow control instead
of an unbounded queue. A slot is freed when its result has been handed to the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")
_END = object()


async def bounded_map(
    items: AsyncIterator[In], work: Callable[[In], Awaitable[Out]], *, concurrency: int
) -> AsyncIterator[Out]:
    """Yield work(item) for each item as it finishes, at most `concurrency` at a time.

    work must not raise: it turns its own failures into results (one bad item must not end
    the stream). If the consumer stops, pending work is cancelled.
    """
    slots = asyncio.Semaphore(concurrency)
    results: asyncio.Queue[object] = asyncio.Queue()

    async def run(item: In) -> None:
        results.put_nowait(await work(item))

    async def feed() -> None:
        running: set[asyncio.Task[None]] = set()
        try:
            async for item in items:
                await slots.acquire()
                task = asyncio.create_task(run(item))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            results.put_nowait(_END)

    feeder = asyncio.create_task(feed())
    try:
        while (result := await results.get()) is not _END:
            yield result  # type: ignore[misc]  # everything but _END came from work()
            slots.release()
        await feeder  # re-raises a failure of the request stream itself
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


async def take_until(items: AsyncIterator[In], stop: asyncio.Event) -> AsyncIterator[In]:
    """Yield items until stop is set (a drain): the next read is abandoned, not awaited.

    An item already read when stop is set is still yielded, so nothing read goes unanswered. A
    read still pending when this ends (stop, or its consumer went away) is cancelled, not left
    behind.
    """
    iterator = aiter(items)
    stopped = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[In] | None = None
    try:
        while not stop.is_set():
            following = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            following = None
            yield item
    finally:
        stopped.cancel()
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
