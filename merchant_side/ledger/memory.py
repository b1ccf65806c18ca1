"""The in-memory ledger: one process, one event loop, forgotten on restart (--insecure-dev only).

Entries are keyed by (app_id, request_id). Every state change of an entry replaces it and sets the
old entry's event, so a waiter sleeps on exactly the entry it saw and wakes on the change, or when
that entry's lease lapses, or at its deadline: no polling. renew and note_attempt change a pending
entry in place: a waiter needs no wake-up for them, its lapse timer finds the renewed lease and
sleeps again. Nothing awaits between looking at an entry and changing it, so on one event loop a
claim is atomic without a lock. Every entry is this ledger's own, so a pending entry is a held
lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Final

import structlog

from merchant_side.ledger.model import (
    Claim,
    TokenRecord,
    check_request_id,
    held_elsewhere,
    is_free,
    is_purgeable,
    keeps_out,
    kept_attempt,
    used_for_another_card,
)

__all__ = ["MemoryLedger"]

PURGE_EVERY: Final = 256
"""Claims between two lazy purges: keeps the dict bounded by the traffic of ~15 minutes."""

_log = structlog.get_logger("merchant_side.ledger")

_Key = tuple[str, str]
"""(app_id, request_id)."""


@dataclasses.dataclass(slots=True)
class _Entry:
    card_ref: str
    lease_until: float
    record: TokenRecord | None = None
    attempt: str | None = dataclasses.field(default=None, repr=False)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def free_at(self, now: float) -> bool:
        return is_free(self.record, self.lease_until, now)

    def keeps_out(self, card_ref: str, now: float) -> bool:
        """Whether a record for card_ref may not replace this entry."""
        return keeps_out(self.record, self.lease_until, self.card_ref, card_ref, now)


class MemoryLedger:
    """A Ledger in a dict; idempotency holds within this process only."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        """Start empty; clock gives epoch seconds (injectable so tests can move time)."""
        self._clock = clock
        self._entries: dict[_Key, _Entry] = {}
        self._claims = 0

    async def claim(
        self,
        app_id: str,
        request_id: str,
        card_ref: str,
        *,
        lease_seconds: float,
        wait_seconds: float,
    ) -> Claim:
        """See Ledger.claim."""
        check_request_id(request_id)
        self._purge_now_and_then()
        key = (app_id, request_id)
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            now = self._clock()
            entry = self._entries.get(key)
            if entry is None or entry.free_at(now):
                attempt = (
                    None
                    if entry is None
                    else kept_attempt(entry.record, entry.card_ref, entry.attempt, card_ref)
                )
                self._replace(key, _Entry(card_ref, now + lease_seconds, attempt=attempt))
                if entry is not None and entry.record is None:
                    _log.warning("ledger_lease_lapsed", request_id=request_id)
                return Claim(None, attempt)
            if entry.card_ref != card_ref:
                raise used_for_another_card(request_id)
            if entry.record is not None:
                return Claim(entry.record)
            await self._wait(request_id, entry, deadline, now)

    async def complete(self, record: TokenRecord) -> None:
        """See Ledger.complete."""
        key = (record.app_id, record.request_id)
        entry = self._entries.get(key)
        if entry is not None and entry.keeps_out(record.card_ref, self._clock()):
            # The first live record is the answer every duplicate already got: keep it.
            _log.warning("ledger_complete_ignored", request_id=record.request_id)
            return
        self._replace(key, _Entry(record.card_ref, 0.0, record))

    async def abandon(self, app_id: str, request_id: str) -> None:
        """See Ledger.abandon."""
        if self._pending((app_id, request_id)) is not None:
            self._replace((app_id, request_id), None)

    async def renew(self, app_id: str, request_id: str, lease_seconds: float) -> bool:
        """See Ledger.renew."""
        entry = self._pending((app_id, request_id))
        if entry is not None:
            entry.lease_until = self._clock() + lease_seconds
        return entry is not None

    async def note_attempt(self, app_id: str, request_id: str, capture_context: str) -> bool:
        """See Ledger.note_attempt."""
        entry = self._pending((app_id, request_id))
        if entry is not None:
            entry.attempt = capture_context
        return entry is not None

    async def get(self, app_id: str, request_id: str) -> TokenRecord | None:
        """See Ledger.get."""
        entry = self._entries.get((app_id, request_id))
        if entry is None or entry.record is None or not entry.record.live_at(self._clock()):
            return None
        return entry.record

    async def purge_expired(self) -> int:
        """See Ledger.purge_expired."""
        return self._purge()

    async def close(self) -> None:
        """Drop every entry and wake every waiter (which then finds the id free)."""
        for key in list(self._entries):
            self._replace(key, None)

    def __len__(self) -> int:
        """Entries held, live or not yet purged."""
        return len(self._entries)

    def _pending(self, key: _Key) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.record is None else None

    def _replace(self, key: _Key, entry: _Entry | None) -> None:
        old = self._entries.pop(key, None)
        if entry is not None:
            self._entries[key] = entry
        if old is not None:
            old.changed.set()

    def _purge_now_and_then(self) -> None:
        self._claims += 1
        if self._claims % PURGE_EVERY == 0:
            self._purge()

    def _purge(self) -> int:
        now = self._clock()
        expired = [
            key
            for key, entry in self._entries.items()
            if is_purgeable(entry.record, entry.lease_until, entry.attempt, now)
        ]
        for key in expired:
            self._replace(key, None)
        return len(expired)

    async def _wait(self, request_id: str, entry: _Entry, deadline: float, now: float) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise held_elsewhere(request_id)
        # Wake on the entry's change, or when its lease lapses, or at the deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, entry.lease_until - now)):
                await entry.changed.wait()
