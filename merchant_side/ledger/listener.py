"""LISTEN/NOTIFY for the PostgreSQL ledger: how a waiter learns that an entry changed.

Each PostgresLedger keeps one connection, outside its pool, that LISTENs on the ledger's channel;
complete() and abandon() NOTIFY with the entry's key (app_id and request_id) as payload, in the same
statement as their write, so the notification is sent exactly when the change commits, to every
replica. A lost connection is reopened in the background; while it is down, and in case a
notification is missed, waiters also re-check on a timer (PostgresLedger chooses the interval from
`listening`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, Final

import psycopg
import structlog

__all__ = ["Listener"]

RECONNECT_SECONDS: Final = 1.0
"""Pause between attempts to reopen a lost LISTEN connection: one attempt a second is cheap."""

_log = structlog.get_logger("merchant_side.ledger")

Connection = psycopg.AsyncConnection[tuple[Any, ...]]


class Listener:
    """Wakes the local waiters of an entry when any replica NOTIFYs its key."""

    def __init__(self, url: str, channel: str) -> None:
        """Not listening yet: call start()."""
        self._url = url
        self._channel = channel
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._connection: Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        """Whether notifications can arrive now (else waiters must poll faster)."""
        running = self._task is not None and not self._task.done()
        return running and self._connection is not None and not self._connection.closed

    async def start(self) -> None:
        """Open the LISTEN connection (errors propagate: the database must answer at open)."""
        self._connection = await self._listen()
        self._task = asyncio.create_task(self._run(), name="token-ledger-listener")

    async def close(self) -> None:
        """Stop listening and wake every waiter, so none sleeps on a closed ledger."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            await self._connection.close()
        self._wake_all()

    @contextlib.contextmanager
    def waiter(self, key: str) -> Iterator[asyncio.Event]:
        """An event set whenever key is notified; register it before reading the row."""
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(key, set())
            events.discard(event)
            if not events:
                self._waiters.pop(key, None)

    async def _listen(self) -> Connection:
        connection = await psycopg.AsyncConnection.connect(self._url, autocommit=True)
        try:
            await connection.execute(f'LISTEN "{self._channel}"')  # a constant identifier
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _run(self) -> None:
        while True:
            connection = self._connection
            assert connection is not None
            try:
                async for notify in connection.notifies():
                    self._wake(notify.payload)
            except psycopg.Error:
                _log.warning("ledger_listener_lost")
            await connection.close()
            self._wake_all()  # what changed while we were deaf is unknown: everyone re-checks
            self._connection = await self._reconnect()
            self._wake_all()

    async def _reconnect(self) -> Connection:
        while True:
            try:
                connection = await self._listen()
            except psycopg.Error:
                await asyncio.sleep(RECONNECT_SECONDS)
            else:
                _log.info("ledger_listener_restored")
                return connection

    def _wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()
