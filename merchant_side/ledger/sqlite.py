"""The SQLite ledger: durable idempotency for one gateway replica, in one file.

A restart keeps every recorded token, lease and noted attempt, so a retry after a crash is
answered from the file instead of tokenizing again. One process owns the file: `open` takes an
exclusive `flock` on `<file>.lock` (kept, never deleted, so two openers always lock the same
inode) and refuses a file another process holds. PostgreSQL is the ledger for several replicas.

Because this process is the only writer, waiting works as in memory.py: each write that changes
what a waiter waits on (complete, abandon, close) wakes that request_id's waiters on this event
loop, and a waiter otherwise sleeps until the lease it saw lapses or its deadline: no polling.

The stdlib sqlite3 module blocks, so every call runs on one dedicated thread that owns the
connection (as the card vault's SQLite store does): the event loop never waits on the disk, and
each function run there is a whole transaction that nothing else can interleave with.

Durability: WAL with `synchronous=FULL`, an fsync of the WAL at every commit. WAL with NORMAL
survives a killed process too (the commit is in the OS page cache), but an OS crash or power
loss may drop the last commits, and a pod restarts on its volume after exactly that. The last
commit may be the attempt noted just before a capture context went to the PCI side, or the
token just issued: losing either lets a retry tokenize again. One fsync per write is the price
of the at-most-once promise (DESIGN.md) through node failures.

sqlite3 errors are translated here and never chained: a driver message can quote row values
(the transient token is a bearer credential); only SQLite's error name travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import structlog

from merchant_side.ledger.model import (
    NOTED_ATTEMPT_KEEP_SECONDS,
    Claim,
    TokenRecord,
    check_request_id,
    held_elsewhere,
    is_free,
    keeps_out,
    kept_attempt,
    used_for_another_card,
)
from relay import sqlitedb
from relay.errors import ConfigError, RelayError, Unavailable

__all__ = ["MIGRATIONS", "URL_PREFIX", "SQLiteLedger", "sqlite_path"]

P = ParamSpec("P")
T = TypeVar("T")

URL_PREFIX: Final = sqlitedb.URL_PREFIX
"""The card vault's convention: `sqlite:///relative.db`, `sqlite:////absolute/ledger.db`."""

_log = structlog.get_logger("merchant_side.ledger")

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE token_ledger (
                request_id TEXT PRIMARY KEY,
                card_ref TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
                lease_owner TEXT,
                lease_until REAL,
                attempt_cc TEXT,
                transient_token TEXT,
                jti TEXT,
                expires_at INTEGER,
                masked_pan TEXT,
                bin TEXT,
                card_type TEXT,
                CHECK (state <> 'pending' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL)),
                CHECK (state = 'pending' OR attempt_cc IS NULL),
                CHECK (state <> 'done' OR (transient_token IS NOT NULL AND jti IS NOT NULL
                    AND expires_at IS NOT NULL AND masked_pan IS NOT NULL AND bin IS NOT NULL
                    AND card_type IS NOT NULL))
            ) STRICT""",
            "CREATE INDEX token_ledger_expiry ON token_ledger (expires_at) WHERE state = 'done'",
            "CREATE INDEX token_ledger_lease ON token_ledger (lease_until) WHERE state = 'pending'",
        ),
    ),
    (
        2,
        (
            # Keyed by (app_id, request_id), and the PCI side's receipt. SQLite cannot change a
            # primary key in place: the table is rebuilt. Rows written before apps had ids get
            # app_id '', which no app can be, so none reaches them; they expire and are purged.
            """CREATE TABLE token_ledger_new (
                app_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
                lease_owner TEXT,
                lease_until REAL,
                attempt_cc TEXT,
                transient_token TEXT,
                jti TEXT,
                expires_at INTEGER,
                masked_pan TEXT,
                bin TEXT,
                card_type TEXT,
                receipt TEXT,
                PRIMARY KEY (app_id, request_id),
                CHECK (state <> 'pending' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL)),
                CHECK (state = 'pending' OR attempt_cc IS NULL),
                CHECK (state <> 'done' OR (transient_token IS NOT NULL AND jti IS NOT NULL
                    AND expires_at IS NOT NULL AND masked_pan IS NOT NULL AND bin IS NOT NULL
                    AND card_type IS NOT NULL))
            ) STRICT""",
            """INSERT INTO token_ledger_new (app_id, request_id, card_ref, state, lease_owner,
                lease_until, attempt_cc, transient_token, jti, expires_at, masked_pan, bin,
                card_type)
            SELECT '', request_id, card_ref, state, lease_owner, lease_until, attempt_cc,
                transient_token, jti, expires_at, masked_pan, bin, card_type FROM token_ledger""",
            "DROP TABLE token_ledger",
            "ALTER TABLE token_ledger_new RENAME TO token_ledger",
            "CREATE INDEX token_ledger_expiry ON token_ledger (expires_at) WHERE state = 'done'",
            "CREATE INDEX token_ledger_lease ON token_ledger (lease_until) WHERE state = 'pending'",
        ),
    ),
)

_RECORD_COLUMNS: Final = "transient_token, jti, expires_at, masked_pan, bin, card_type, receipt"
_KEY: Final = "app_id = :app_id AND request_id = :request_id"
_READ: Final = (
    f"SELECT state, card_ref, lease_until, attempt_cc, {_RECORD_COLUMNS} "  # noqa: S608 - constants
    f"FROM token_ledger WHERE {_KEY}"
)
# REPLACE: the row a claim takes over or a complete overwrites goes whole; a takeover carries
# the noted attempt over itself (model.kept_attempt), so the next holder still knows it.
_TAKE: Final = (
    "INSERT OR REPLACE INTO token_ledger "
    "(app_id, request_id, card_ref, state, lease_owner, lease_until, attempt_cc) "
    "VALUES (:app_id, :request_id, :card_ref, 'pending', :owner, :lease_until, :attempt)"
)
_STORE: Final = (
    "INSERT OR REPLACE INTO token_ledger "  # noqa: S608 - constants
    f"(app_id, request_id, card_ref, state, {_RECORD_COLUMNS}) "
    "VALUES (:app_id, :request_id, :card_ref, 'done', :transient_token, :jti, :expires_at, "
    ":masked_pan, :bin, :card_type, :receipt)"
)
# A lease this ledger holds (lapsed or not) that nobody has taken over.
_HELD: Final = f"{_KEY} AND state = 'pending' AND lease_owner = :owner"
_ABANDON: Final = f"DELETE FROM token_ledger WHERE {_HELD}"  # noqa: S608 - constants
_RENEW: Final = f"UPDATE token_ledger SET lease_until = :lease_until WHERE {_HELD}"  # noqa: S608
_NOTE_ATTEMPT: Final = f"UPDATE token_ledger SET attempt_cc = :attempt WHERE {_HELD}"  # noqa: S608
# model.is_purgeable: a lapsed claim with a noted attempt is kept a while longer.
_PURGE: Final = (
    "DELETE FROM token_ledger "
    "WHERE (state = 'pending' AND attempt_cc IS NULL AND lease_until <= :now) "
    "OR (state = 'pending' AND lease_until <= :now - :keep) "
    "OR (state = 'done' AND expires_at <= :now)"
)


def sqlite_path(url: str) -> str:
    """The file a RELAY_MERCHANT_LEDGER_URL names (relay.sqlitedb's convention)."""
    return sqlitedb.sqlite_path(url, "RELAY_MERCHANT_LEDGER_URL")


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    """One request_id's row as a transaction read it."""

    card_ref: str
    lease_until: float
    """0 for a done row."""
    attempt: str | None = dataclasses.field(repr=False)
    record: TokenRecord | None

    def free_at(self, now: float) -> bool:
        return is_free(self.record, self.lease_until, now)

    def keeps_out(self, card_ref: str, now: float) -> bool:
        """Whether a record for card_ref may not replace this row."""
        return keeps_out(self.record, self.lease_until, self.card_ref, card_ref, now)


_Key = tuple[str, str]
"""(app_id, request_id)."""


class _Waiters:
    """The events of this process's waiters, by (app_id, request_id)."""

    def __init__(self) -> None:
        self._events: dict[_Key, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def waiter(self, key: _Key) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            events = self._events.get(key, set())
            events.discard(event)
            if not events:
                self._events.pop(key, None)

    def wake(self, key: _Key) -> None:
        for event in self._events.get(key, ()):
            event.set()

    def wake_all(self) -> None:
        for key in list(self._events):
            self.wake(key)


class SQLiteLedger:
    """A Ledger in one SQLite file that this process alone holds."""

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        connection: sqlite3.Connection,
        lock: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Take over the executor, the connection its thread opened and the lock; see `open`."""
        self._executor = executor
        self._connection = connection
        self._lock = lock
        self._clock = clock
        self._waiters = _Waiters()
        self._closed = False
        # Leases written by an earlier process on this file are not ours: they lapse, and a
        # claim then takes them over with the attempt they noted.
        self._owner = uuid.uuid4().hex

    @classmethod
    async def open(cls, path: str, *, clock: Callable[[], float] = time.time) -> SQLiteLedger:
        """Lock the file, open (creating if needed) and migrate it, all off the event loop."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        try:
            lock, connection = await asyncio.get_running_loop().run_in_executor(
                executor, _open, path
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        ledger = cls(executor, connection, lock, clock=clock)
        try:
            await ledger._run(_migrate, dt.datetime.now(dt.UTC).isoformat())
        except BaseException:
            await ledger.close()
            raise
        return ledger

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
        deadline = asyncio.get_running_loop().time() + wait_seconds
        # Registered before the first read, so a change written after that read wakes us.
        with self._waiters.waiter((app_id, request_id)) as changed:
            while True:
                changed.clear()
                now = self._clock()
                lease = self._held(
                    app_id, request_id, card_ref=card_ref, lease_until=now + lease_seconds
                )
                owned, row = await self._run(_claim, lease, now)
                if owned:
                    return _taken_over(request_id, card_ref, row)
                assert row is not None  # a row we did not take is one we found
                if row.card_ref != card_ref:
                    raise used_for_another_card(request_id)
                if row.record is not None:
                    return Claim(row.record)
                await self._wait(request_id, changed, deadline, row.lease_until - now)

    async def complete(self, record: TokenRecord) -> None:
        """See Ledger.complete."""
        if await self._run(_complete, record, self._clock()):
            self._waiters.wake((record.app_id, record.request_id))
        else:
            _log.warning("ledger_complete_ignored", request_id=record.request_id)

    async def abandon(self, app_id: str, request_id: str) -> None:
        """See Ledger.abandon."""
        if await self._run(_held_write, _ABANDON, self._held(app_id, request_id)):
            self._waiters.wake((app_id, request_id))

    async def renew(self, app_id: str, request_id: str, lease_seconds: float) -> bool:
        """See Ledger.renew."""
        params = self._held(app_id, request_id, lease_until=self._clock() + lease_seconds)
        return await self._run(_held_write, _RENEW, params)

    async def note_attempt(self, app_id: str, request_id: str, capture_context: str) -> bool:
        """See Ledger.note_attempt."""
        params = self._held(app_id, request_id, attempt=capture_context)
        return await self._run(_held_write, _NOTE_ATTEMPT, params)

    async def get(self, app_id: str, request_id: str) -> TokenRecord | None:
        """See Ledger.get."""
        row = await self._run(_read, app_id, request_id)
        if row is None or row.record is None or not row.record.live_at(self._clock()):
            return None
        return row.record

    async def purge_expired(self) -> int:
        """See Ledger.purge_expired."""
        # Waiters on a lapsed lease wake on their own timer, so a purge wakes nobody.
        return await self._run(_purge, self._clock())

    async def close(self) -> None:
        """Close the file and release its lock, then wake every waiter (they get Unavailable)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, _close, self._connection, self._lock)
        finally:
            self._executor.shutdown(wait=False)
            self._waiters.wake_all()

    def _held(self, app_id: str, request_id: str, **values: object) -> dict[str, object]:
        return {"app_id": app_id, "request_id": request_id, "owner": self._owner, **values}

    async def _run(
        self,
        function: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._closed:
            raise Unavailable("the token ledger is closed")
        call = functools.partial(function, self._connection, *args, **kwargs)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.OperationalError as exc:
            raise Unavailable(
                "token ledger database is unavailable", sqlite_error=exc.sqlite_errorname
            ) from None
        except sqlite3.Error as exc:
            raise RelayError(
                "token ledger database refused a statement", sqlite_error=exc.sqlite_errorname
            ) from None

    async def _wait(
        self, request_id: str, changed: asyncio.Event, deadline: float, lapse: float
    ) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise held_elsewhere(request_id)
        # Wake on a change written here, when the lease lapses (then take it over), or at the
        # deadline.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, lapse)):
                await changed.wait()


def _taken_over(request_id: str, card_ref: str, row: _Row | None) -> Claim:
    if row is None or row.record is not None:
        return Claim(None)
    _log.warning("ledger_lease_lapsed", request_id=request_id)
    return Claim(None, kept_attempt(row.record, row.card_ref, row.attempt, card_ref))


# --- On the ledger's thread ---------------------------------------------------------------------


def _open(path: str) -> tuple[int, sqlite3.Connection]:
    cannot_open = "RELAY_MERCHANT_LEDGER_URL names a SQLite file that cannot be created or opened"
    try:
        lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        raise ConfigError([cannot_open]) from None
    try:
        _lock(lock)
        return lock, _connect(path)
    except (sqlite3.Error, OSError):
        os.close(lock)
        raise ConfigError([cannot_open]) from None
    except BaseException:
        os.close(lock)
        raise


def _lock(lock: int) -> None:
    try:
        # flock, not a POSIX record lock: it also refuses a second opener in this process.
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        in_use = "the SQLite ledger of RELAY_MERCHANT_LEDGER_URL is in use by another process"
        raise ConfigError([f"{in_use}: use PostgreSQL for several replicas"]) from None


def _connect(path: str) -> sqlite3.Connection:
    # Created owner-only before SQLite opens it (its -wal and -shm files copy the mode): the
    # file holds transient tokens, bearer credentials for 15 minutes.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    # isolation_level=None: no implicit transactions; a read-then-write says BEGIN IMMEDIATE.
    connection = sqlite3.connect(path, isolation_level=None)
    sqlitedb.use_wal(connection)
    connection.execute("PRAGMA synchronous = FULL")
    return connection


def _close(connection: sqlite3.Connection, lock: int) -> None:
    try:
        connection.close()
    finally:
        os.close(lock)


def _migrate(connection: sqlite3.Connection, applied_at: str) -> None:
    sqlitedb.migrate(
        connection,
        MIGRATIONS,
        table="token_ledger_schema",
        applied_at=applied_at,
        newer="the token ledger's schema is newer than this relay: upgrade",
    )


def _read(connection: sqlite3.Connection, app_id: str, request_id: str) -> _Row | None:
    found = connection.execute(_READ, {"app_id": app_id, "request_id": request_id}).fetchone()
    if found is None:
        return None
    state, card_ref, lease_until, attempt, *columns = found
    if state == "pending":
        return _Row(card_ref, lease_until, attempt, None)
    return _Row(card_ref, 0.0, None, _record(app_id, request_id, card_ref, columns))


def _record(app_id: str, request_id: str, card_ref: str, columns: list[Any]) -> TokenRecord:
    token, jti, expires_at, masked_pan, bin_, card_type, receipt = columns
    facts = (token, jti, expires_at, masked_pan, bin_, card_type, receipt or "")
    return TokenRecord(app_id, request_id, card_ref, *facts)


def _claim(
    connection: sqlite3.Connection, lease: dict[str, object], now: float
) -> tuple[bool, _Row | None]:
    """(whether the lease on lease["request_id"] is now ours, the row as it was before)."""
    with sqlitedb.transaction(connection):
        row = _read(connection, str(lease["app_id"]), str(lease["request_id"]))
        if row is not None and not row.free_at(now):
            return False, row
        attempt = None
        if row is not None:
            attempt = kept_attempt(row.record, row.card_ref, row.attempt, str(lease["card_ref"]))
        connection.execute(_TAKE, {**lease, "attempt": attempt})
        return True, row


def _complete(connection: sqlite3.Connection, record: TokenRecord, now: float) -> bool:
    with sqlitedb.transaction(connection):
        row = _read(connection, record.app_id, record.request_id)
        if row is not None and row.keeps_out(record.card_ref, now):
            # The first live record is the answer every duplicate already got: keep it.
            return False
        params = dataclasses.asdict(record)
        connection.execute(_STORE, params)
        return True


def _held_write(connection: sqlite3.Connection, sql: str, params: dict[str, object]) -> bool:
    return connection.execute(sql, params).rowcount == 1


def _purge(connection: sqlite3.Connection, now: float) -> int:
    return connection.execute(_PURGE, {"now": now, "keep": NOTED_ATTEMPT_KEEP_SECONDS}).rowcount
