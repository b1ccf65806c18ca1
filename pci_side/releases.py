"""Card releases by capture context, in this process: one attempt's result, never two attempts.

When the merchant side loses sight of an attempt (its stream broke, its replica died), it sends
the same request again under the same capture context. If that attempt is still running here,
the repeat waits for it; if it succeeded, the repeat gets the same transient token back. Either
way the card goes to Flex once. An attempt that failed is forgotten: the repeat runs afresh.

Entries live until the transient token expires (or, for a running attempt, until it ends), so
the map holds about fifteen minutes of traffic. The map is per process: a repeat that lands on
another PciRelay replica is a new attempt there (the audit chain shows both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Final, Generic, TypeVar

__all__ = ["Release", "ReleaseKey", "Releases"]

T = TypeVar("T")

PURGE_EVERY: Final = 256
"""Starts between two purges of expired entries."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReleaseKey:
    """What a repeat must match to share an attempt: the same request, by the same merchant."""

    merchant_id: str
    request_id: str
    card_ref: str
    app_id: str = ""


class Release(Generic[T]):
    """One attempt's entry: resolve it once with finish() or fail()."""

    __slots__ = ("_cc_jti", "_owner", "keep_until", "key", "result")

    def __init__(self, owner: Releases[T], cc_jti: str, key: ReleaseKey) -> None:
        """Use Releases.start."""
        self._owner = owner
        self._cc_jti = cc_jti
        self.key = key
        self.keep_until = float("inf")
        self.result: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def finish(self, value: T, *, keep_until: float) -> None:
        """The attempt succeeded: repeats get value until keep_until (epoch seconds)."""
        self.keep_until = keep_until
        if not self.result.done():
            self.result.set_result(value)

    def fail(self, error: BaseException) -> None:
        """The attempt failed: waiting repeats get the error, later ones start afresh."""
        self._owner.forget(self._cc_jti, self)
        if not self.result.done():
            self.result.set_exception(error)
            self.result.exception()  # retrieved here: a repeat may never come


class Releases(Generic[T]):
    """Running and successful attempts by capture-context jti."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """Start empty; clock gives epoch seconds, compared with transient-token expiries."""
        self._clock = clock
        self._entries: dict[tuple[str, ReleaseKey], Release[T]] = {}
        self._starts = 0

    def find(self, cc_jti: str, key: ReleaseKey) -> asyncio.Future[T] | None:
        """The running or successful attempt under cc_jti for the same request, if any."""
        entry = self._entries.get((cc_jti, key))
        if entry is None or entry.keep_until <= self._clock():
            return None
        return entry.result

    def start(self, cc_jti: str, key: ReleaseKey) -> Release[T]:
        """Register a new attempt of this request under cc_jti.

        Keyed by context and request: another request under the same context (refused when it
        claims the context) never touches this one's entry.
        """
        self._starts += 1
        if self._starts % PURGE_EVERY == 0:
            self._purge()
        entry = Release(self, cc_jti, key)
        self._entries[(cc_jti, key)] = entry
        return entry

    def forget(self, cc_jti: str, entry: Release[T]) -> None:
        """Drop entry, unless another attempt of its request has replaced it since."""
        if self._entries.get((cc_jti, entry.key)) is entry:
            del self._entries[(cc_jti, entry.key)]

    def __len__(self) -> int:
        """Entries held, running or kept."""
        return len(self._entries)

    def _purge(self) -> None:
        now = self._clock()
        for slot, entry in list(self._entries.items()):
            if entry.keep_until <= now:
                del self._entries[slot]
