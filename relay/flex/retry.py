"""Retries with full-jitter exponential backoff, for idempotent Flex calls.

Modelled on api-core's retry: a predicate decides what is retryable (FlexUnavailable), the
delay is uniform in [0, min(max, initial * 2**attempt)], and sleep is injected for tests.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.errors import FlexUnavailable

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


async def with_retries(  # noqa: PLR0913  every knob is explicit for the caller's tests
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    initial: float,
    maximum: float,
    sleep: Sleep = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run call until it succeeds, raises a non-retryable error, or attempts run out."""
    for attempt in range(attempts):
        try:
            return await call()
        except FlexUnavailable as exc:
            if attempt == attempts - 1:
                raise
            cap = min(maximum, initial * 2**attempt)
            hinted = exc.retry_after if exc.retry_after is not None else 0.0
            await sleep(max(rng() * cap, min(hinted, maximum)))
    raise AssertionError("unreachable: attempts must be at least 1")
