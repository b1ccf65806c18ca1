"""A token bucket per merchant, the guard against card enumeration by a granted merchant."""

from __future__ import annotations

import time
from collections.abc import Callable

from relay.errors import RateLimited


class RateLimiter:
    """Allows `burst` calls at once and `rate` per second sustained, per merchant."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Buckets start full."""
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, merchant_id: str) -> None:
        """Take one token for merchant_id, or raise RateLimited."""
        now = self._clock()
        tokens, last = self._buckets.get(merchant_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[merchant_id] = (tokens, now)
            raise RateLimited("too many requests; slow down", merchant=merchant_id)
        self._buckets[merchant_id] = (tokens - 1.0, now)
