"""The public-key store: Flex long-term keys by kid, fetched once and cached.

Keys are immutable per kid, so a hit is forever (bounded). A miss starts one fetch that every
concurrent caller for that kid awaits (single flight). A kid Flex does not know is remembered
briefly (negative cache), so a flood of forged contexts costs Flex one request per kid per
window. refresh() refetches a cached kid at most once per window, for key rotation.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from relay.errors import PublicKeyNotFound

T = TypeVar("T")
Fetch = Callable[[str], Awaitable[Mapping[str, str] | None]]


class PublicKeyStore:
    """Caches Flex public keys by kid behind a single-flight fetch."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        negative_ttl: float = 30.0,
        refresh_interval: float = 60.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """fetch(kid) returns the JWK, None for an unknown kid, or raises a RelayError."""
        self._fetch = fetch
        self._negative_ttl = negative_ttl
        self._refresh_interval = refresh_interval
        self._max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, Mapping[str, str]] = OrderedDict()
        self._fetched_at: OrderedDict[str, float] = OrderedDict()
        self._unknown_until: OrderedDict[str, float] = OrderedDict()
        self._in_flight: dict[str, asyncio.Future[Mapping[str, str]]] = {}

    async def get(self, kid: str) -> Mapping[str, str]:
        """Return the key for kid, fetching it once if it is not cached."""
        key = self._keys.get(kid)
        if key is not None:
            self._keys.move_to_end(kid)
            return key
        if self._unknown_until.get(kid, 0.0) > self._clock():
            raise PublicKeyNotFound("Flex does not know this key id", kid=kid)
        return await self._single_flight(kid)

    async def refresh(self, kid: str) -> Mapping[str, str] | None:
        """Refetch a cached kid after a failed verification; None if refetched too recently."""
        if self._clock() - self._fetched_at.get(kid, float("-inf")) < self._refresh_interval:
            return None
        self._keys.pop(kid, None)
        return await self._single_flight(kid)

    def __len__(self) -> int:
        """How many keys are cached."""
        return len(self._keys)

    async def _single_flight(self, kid: str) -> Mapping[str, str]:
        task = self._in_flight.get(kid)
        if task is None:
            task = asyncio.ensure_future(self._load(kid))
            self._in_flight[kid] = task
            task.add_done_callback(lambda done: self._settled(kid, done))
        # shield: one impatient caller must not cancel the fetch the others are waiting on.
        return await asyncio.shield(task)

    def _settled(self, kid: str, task: asyncio.Future[Mapping[str, str]]) -> None:
        self._in_flight.pop(kid, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

    async def _load(self, kid: str) -> Mapping[str, str]:
        key = await self._fetch(kid)
        now = self._clock()
        _put_bounded(self._fetched_at, kid, now, self._max_keys * 4)
        if key is None:
            # Bounded too: a flood of forged kids must not grow memory without limit.
            _put_bounded(self._unknown_until, kid, now + self._negative_ttl, self._max_keys * 4)
            raise PublicKeyNotFound("Flex does not know this key id", kid=kid)
        self._unknown_until.pop(kid, None)
        _put_bounded(self._keys, kid, key, self._max_keys)
        return key


def _put_bounded(table: OrderedDict[str, T], key: str, value: T, limit: int) -> None:
    """Insert as newest, dropping the oldest entries beyond limit."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)
