"""Token buckets in memory, one per key.

Keys are merchants at PciRelay (the guard against card enumeration; a PostgreSQL vault shares
its buckets across replicas instead) and apps at the MerchantGateway.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from relay.errors import RateLimited


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """A configured limit: `per_second` sustained, `burst` at once."""

    per_second: float
    burst: int


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
        if not self.try_take(merchant_id):
            raise RateLimited("too many requests; slow down", merchant=merchant_id)

    def try_take(self, key: str) -> bool:
        """Take one token from key's bucket; False (and nothing taken) if it is empty."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True
