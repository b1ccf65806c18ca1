"""The per-merchant token bucket."""

from __future__ import annotations

import pytest

from relay.errors import RateLimited
from relay.ratelimit import RateLimiter


def test_burst_then_refusal_then_refill() -> None:
    """burst calls pass, the next is refused, and time refills the bucket at rate."""
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.acquire("m1")
    with pytest.raises(RateLimited):
        limiter.acquire("m1")
    now[0] = 0.5
    limiter.acquire("m1")
    with pytest.raises(RateLimited):
        limiter.acquire("m1")


def test_merchants_have_their_own_buckets() -> None:
    """One merchant's exhaustion does not limit another."""
    limiter = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0)
    limiter.acquire("m1")
    limiter.acquire("m2")
    with pytest.raises(RateLimited):
        limiter.acquire("m1")
