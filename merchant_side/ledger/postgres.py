"""The PostgreSQL ledger: replicas share one table, so a request_id is tokenized once by all.

Atomicity comes from single statements, not from locks held across a round trip:

- claim is one statement: `INSERT ... ON CONFLICT DO NOTHING` takes a new id, a
  `SELECT ... FOR UPDATE` of the row if it is free (lease lapsed, or record expired) locks it for
  an `UPDATE` that takes it over, and a SELECT reads the row as it was. Two replicas racing on
  one row serialize on its row lock; the loser's locking read re-checks its WHERE against the
  winner's row and matches nothing, so only one owns it.
- The takeover returns the attempt the lapsed holder noted from its locking read, not from the
  statement's snapshot: a note_attempt that commits while the takeover waits for the row lock
  is then what the new holder is told about, never an older attempt.
- renew and note_attempt are single UPDATEs of a pending row that this replica owns; the row
  count says whether it still held the lease.
- Rows are keyed by (app_id, request_id); the NOTIFY payload names both (`notice_key`).
- complete and abandon write and `pg_notify` in one statement, so waiters everywhere hear of the
  change when it commits (listener.py); a timer re-check covers lapsed leases and lost notices.
- abandon only ends a lease this ledger (this replica) holds, so a replica whose lease lapsed
  cannot end the lease of the replica that took over.

Times are epoch seconds from the injected clock, passed as parameters, never the server's now():
the tests move time, and replicas agree with the memory backend on when a token expires.
Driver errors are translated here. The driver's text can quote row values (the transient token,
a bearer credential), so it is never chained or logged: only its SQLSTATE travels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from merchant_side.ledger.listener import Listener
from merchant_side.ledger.model import (
    NOTED_ATTEMPT_KEEP_SECONDS,
    Claim,
    TokenRecord,
    check_request_id,
    held_elsewhere,
    used_for_another_card,
)
from relay.errors import ConfigError, RelayError, Unavailable

__all__ = ["MIGRATIONS", "PostgresLedger"]

_log = structlog.get_logger("merchant_side.ledger")

Connection = psycopg.AsyncConnection[tuple[Any, ...]]

CHANNEL: Final = "token_ledger"
MIGRATION_LOCK: Final = 0x6C65646765725F31  # "ledger_1": the advisory lock key of migrations
OPEN_TIMEOUT_SECONDS: Final = 30.0
POLL_SECONDS: Final = 0.5
"""Re-check interval while LISTEN works: only a safety net for a lost notification."""
FALLBACK_POLL_SECONDS: Final = 0.05
"""Re-check interval while the LISTEN connection is down."""

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE token_ledger (
                request_id TEXT COLLATE "C" PRIMARY KEY,
                card_ref TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
                lease_owner TEXT,
                lease_until DOUBLE PRECISION,
                transient_token TEXT,
                jti TEXT,
                expires_at BIGINT,
                masked_pan TEXT,
                bin TEXT,
                card_type TEXT,
                CHECK (state <> 'pending' OR (lease_owner IS NOT NULL AND lease_until IS NOT NULL)),
                CHECK (state <> 'done' OR (transient_token IS NOT NULL AND jti IS NOT NULL
                    AND expires_at IS NOT NULL AND masked_pan IS NOT NULL AND bin IS NOT NULL
                    AND card_type IS NOT NULL))
            )""",
            "CREATE INDEX token_ledger_expiry ON token_ledger (expires_at) WHERE state = 'done'",
            "CREATE INDEX token_ledger_lease ON token_ledger (lease_until) WHERE state = 'pending'",
        ),
    ),
    (
        2,
        (
            # The capture context a lease holder is about to send (model.py), only while pending.
            "ALTER TABLE token_ledger ADD COLUMN attempt_cc TEXT",
            (
                "ALTER TABLE token_ledger ADD CONSTRAINT token_ledger_attempt_pending "
                "CHECK (state = 'pending' OR attempt_cc IS NULL)"
            ),
        ),
    ),
    (
        3,
        (
            # Keyed by (app_id, request_id), and the PCI side's receipt. Rows written before
            # apps had ids get app_id '', which no app can be, so none reaches them; they expire
            # and are purged. The default goes once it has filled them: every write names an app.
            "ALTER TABLE token_ledger ADD COLUMN app_id TEXT COLLATE \"C\" NOT NULL DEFAULT ''",
            "ALTER TABLE token_ledger ALTER COLUMN app_id DROP DEFAULT",
            "ALTER TABLE token_ledger ADD COLUMN receipt TEXT",
            "ALTER TABLE token_ledger DROP CONSTRAINT token_ledger_pkey",
            "ALTER TABLE token_ledger ADD PRIMARY KEY (app_id, request_id)",
        ),
    ),
)

_RECORD_COLUMNS: Final = "transient_token, jti, expires_at, masked_pan, bin, card_type, receipt"
_KEY: Final = "app_id = %(app_id)s AND request_id = %(request_id)s"
_NOTICE: Final = "app_id || ' ' || request_id"
"""The NOTIFY payload, as notice_key() spells it: an app id has no space."""
_FREE: Final = (
    "((state = 'pending' AND lease_until <= %(now)s) OR (state = 'done' AND expires_at <= %(now)s))"
)
# The main SELECT sees the row as it was before this statement (data-modifying CTEs are not
# visible to it): `owned` says whether we took it, the rest what we found. `locked` reads the
# row as it is once its lock is ours (READ COMMITTED re-reads a row a concurrent writer changed),
# so the state and attempt `taken` returns are those we replaced, not the snapshot's.
_CLAIM: Final = f"""
WITH inserted AS (
    INSERT INTO token_ledger (app_id, request_id, card_ref, state, lease_owner, lease_until)
    VALUES (%(app_id)s, %(request_id)s, %(card_ref)s, 'pending', %(owner)s, %(lease_until)s)
    ON CONFLICT (app_id, request_id) DO NOTHING
    RETURNING 1
), locked AS (
    SELECT app_id, request_id, state, card_ref,
        CASE WHEN state = 'pending' AND card_ref = %(card_ref)s THEN attempt_cc END AS kept
    FROM token_ledger
    WHERE {_KEY} AND {_FREE}
    FOR UPDATE
), taken AS (
    UPDATE token_ledger SET card_ref = %(card_ref)s, state = 'pending', lease_owner = %(owner)s,
        lease_until = %(lease_until)s, attempt_cc = locked.kept, transient_token = NULL,
        jti = NULL, expires_at = NULL, masked_pan = NULL, bin = NULL, card_type = NULL,
        receipt = NULL
    FROM locked
    WHERE token_ledger.app_id = locked.app_id AND token_ledger.request_id = locked.request_id
    RETURNING locked.state, locked.kept
)
SELECT EXISTS (SELECT 1 FROM inserted) OR EXISTS (SELECT 1 FROM taken),
    (SELECT state FROM taken), (SELECT kept FROM taken),
    found.state, found.card_ref, found.lease_until, {_RECORD_COLUMNS}
FROM (SELECT 1) AS one LEFT JOIN token_ledger AS found
    ON found.app_id = %(app_id)s AND found.request_id = %(request_id)s
"""  # noqa: S608 - only constants are interpolated
# A live record already stored wins: it is what every duplicate has been given.
_COMPLETE: Final = f"""
WITH stored AS (
    INSERT INTO token_ledger (app_id, request_id, card_ref, state, {_RECORD_COLUMNS})
    VALUES (%(app_id)s, %(request_id)s, %(card_ref)s, 'done', %(transient_token)s, %(jti)s,
        %(expires_at)s, %(masked_pan)s, %(bin)s, %(card_type)s, %(receipt)s)
    ON CONFLICT (app_id, request_id) DO UPDATE SET card_ref = EXCLUDED.card_ref, state = 'done',
        lease_owner = NULL, lease_until = NULL, attempt_cc = NULL,
        transient_token = EXCLUDED.transient_token, jti = EXCLUDED.jti,
        expires_at = EXCLUDED.expires_at, masked_pan = EXCLUDED.masked_pan, bin = EXCLUDED.bin,
        card_type = EXCLUDED.card_type, receipt = EXCLUDED.receipt
    WHERE (token_ledger.state = 'pending' AND (token_ledger.card_ref = EXCLUDED.card_ref
            OR token_ledger.lease_until <= %(now)s))
        OR (token_ledger.state = 'done' AND token_ledger.expires_at <= %(now)s)
    RETURNING {_NOTICE} AS notice
)
SELECT pg_notify('{CHANNEL}', notice) FROM stored
"""  # noqa: S608 - only constants are interpolated
# A lease this replica holds (lapsed or not) that nobody has taken over.
_HELD: Final = f"{_KEY} AND state = 'pending' AND lease_owner = %(owner)s"
_ABANDON: Final = f"""
WITH gone AS (
    DELETE FROM token_ledger WHERE {_HELD} RETURNING {_NOTICE} AS notice
)
SELECT pg_notify('{CHANNEL}', notice) FROM gone
"""  # noqa: S608 - only constants are interpolated
_GET: Final = (
    f"SELECT card_ref, {_RECORD_COLUMNS} FROM token_ledger "  # noqa: S608 - constants
    f"WHERE {_KEY} AND state = 'done' AND expires_at > %(now)s"
)
_RENEW: Final = f"UPDATE token_ledger SET lease_until = %(lease_until)s WHERE {_HELD}"  # noqa: S608
_NOTE_ATTEMPT: Final = f"UPDATE token_ledger SET attempt_cc = %(attempt)s WHERE {_HELD}"  # noqa: S608
# Waiters on a lapsed lease wake on their own timer, so a purge needs no NOTIFY.
# model.is_purgeable: a lapsed claim with a noted attempt is kept a while longer.
_PURGE: Final = (
    f"DELETE FROM token_ledger WHERE {_FREE} "  # noqa: S608 - constants
    "AND (attempt_cc IS NULL OR lease_until <= %(now)s - %(keep)s)"
)


class PostgresLedger:
    """A Ledger in one PostgreSQL table, shared by every replica that opens the same database."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        listener: Listener,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Take over an open pool and a started listener; see `open`."""
        self._pool = pool
        self._listener = listener
        self._clock = clock
        # Names this replica's leases, so abandon() cannot end a lease another replica took over.
        self._owner = uuid.uuid4().hex

    @classmethod
    async def open(
        cls, url: str, *, clock: Callable[[], float] = time.time, pool_size: int = 10
    ) -> PostgresLedger:
        """Open the pool, create or upgrade the table, and start listening."""
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            name="relay-ledger",
        )
        try:
            await pool.open(wait=True, timeout=OPEN_TIMEOUT_SECONDS)
        except PoolTimeout as exc:
            await pool.close()
            raise Unavailable(
                "token ledger database unreachable: check RELAY_MERCHANT_LEDGER_URL"
            ) from exc
        listener = Listener(url, CHANNEL)
        ledger = cls(pool, listener, clock=clock)
        try:
            await ledger._migrate()
            async with _translated():
                await listener.start()
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
        stale = 0
        key = (app_id, request_id)
        # Registered before the first read, so a change committed after that read wakes us.
        with self._listener.waiter(notice_key(*key)) as changed:
            while True:
                changed.clear()
                now = self._clock()
                params = self._claim_params(key, card_ref, now + lease_seconds, now)
                row = await self._fetch_one(_CLAIM, params)
                owned, replaced, attempt, state, found_ref, lease_until, *record = row
                if owned:
                    if replaced == "pending":
                        _log.warning("ledger_lease_lapsed", request_id=request_id)
                    return Claim(None, attempt)
                if state is None or _free(state, lease_until, record[2], now):
                    # A writer changed the row after this statement's snapshot and has committed
                    # (we waited on its lock), so one re-read sees it; any further are paced.
                    stale += 1
                    if stale > 1:
                        await self._wait(request_id, changed, deadline, now + FALLBACK_POLL_SECONDS)
                    continue
                if found_ref != card_ref:
                    raise used_for_another_card(request_id)
                if state == "done":
                    return Claim(_record(key, found_ref, record))
                await self._wait(request_id, changed, deadline, lease_until)

    async def complete(self, record: TokenRecord) -> None:
        """See Ledger.complete."""
        params = {
            "app_id": record.app_id,
            "request_id": record.request_id,
            "card_ref": record.card_ref,
            "transient_token": record.transient_token,
            "jti": record.jti,
            "expires_at": record.expires_at,
            "masked_pan": record.masked_pan,
            "bin": record.bin,
            "card_type": record.card_type,
            "receipt": record.receipt,
            "now": self._clock(),
        }
        async with _translated(), self._pool.connection() as conn:
            cursor = await conn.execute(_COMPLETE, params)
            stored = await cursor.fetchone()
        if stored is None:
            _log.warning("ledger_complete_ignored", request_id=record.request_id)

    async def abandon(self, app_id: str, request_id: str) -> None:
        """See Ledger.abandon."""
        params = {"app_id": app_id, "request_id": request_id, "owner": self._owner}
        async with _translated(), self._pool.connection() as conn:
            await conn.execute(_ABANDON, params)

    async def renew(self, app_id: str, request_id: str, lease_seconds: float) -> bool:
        """See Ledger.renew."""
        lease_until = self._clock() + lease_seconds
        return await self._held_update(_RENEW, app_id, request_id, lease_until=lease_until)

    async def note_attempt(self, app_id: str, request_id: str, capture_context: str) -> bool:
        """See Ledger.note_attempt."""
        return await self._held_update(_NOTE_ATTEMPT, app_id, request_id, attempt=capture_context)

    async def get(self, app_id: str, request_id: str) -> TokenRecord | None:
        """See Ledger.get."""
        params = {"app_id": app_id, "request_id": request_id, "now": self._clock()}
        async with _translated(), self._pool.connection() as conn:
            cursor = await conn.execute(_GET, params)
            row = await cursor.fetchone()
        return None if row is None else _record((app_id, request_id), row[0], row[1:])

    async def purge_expired(self) -> int:
        """See Ledger.purge_expired."""
        async with _translated(), self._pool.connection() as conn:
            cursor = await conn.execute(
                _PURGE, {"now": self._clock(), "keep": NOTED_ATTEMPT_KEEP_SECONDS}
            )
            return cursor.rowcount

    async def close(self) -> None:
        """Stop listening and close every pooled connection."""
        await self._listener.close()
        await self._pool.close()

    def _claim_params(
        self, key: tuple[str, str], card_ref: str, lease_until: float, now: float
    ) -> dict[str, object]:
        return {
            "app_id": key[0],
            "request_id": key[1],
            "card_ref": card_ref,
            "owner": self._owner,
            "lease_until": lease_until,
            "now": now,
        }

    async def _held_update(self, sql: str, app_id: str, request_id: str, **values: object) -> bool:
        params = {"app_id": app_id, "request_id": request_id, "owner": self._owner, **values}
        async with _translated(), self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            return cursor.rowcount == 1

    async def _fetch_one(self, sql: str, params: dict[str, object]) -> tuple[Any, ...]:
        async with _translated(), self._pool.connection() as conn:
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone()
        assert row is not None  # the statement always yields one row
        return row

    async def _wait(
        self, request_id: str, changed: asyncio.Event, deadline: float, lease_until: float
    ) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise held_elsewhere(request_id)
        poll = POLL_SECONDS if self._listener.listening else FALLBACK_POLL_SECONDS
        # Wake on a notice, when the lease lapses (then take it over), or to re-check.
        lapse = max(lease_until - self._clock(), 0.001)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(remaining, poll, lapse)):
                await changed.wait()

    async def _migrate(self) -> None:
        async with _translated(), self._pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS token_ledger_schema "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cursor = await conn.execute("SELECT version FROM token_ledger_schema")
            applied = {row[0] for row in await cursor.fetchall()}
            if applied - {version for version, _ in MIGRATIONS}:
                raise ConfigError(["the token ledger's schema is newer than this relay: upgrade"])
            for version, statements in MIGRATIONS:
                if version not in applied:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO token_ledger_schema (version) VALUES (%s)", (version,)
                    )


def _free(state: str, lease_until: float | None, expires_at: int | None, now: float) -> bool:
    if state == "pending":
        return lease_until is not None and lease_until <= now
    return expires_at is not None and expires_at <= now


def notice_key(app_id: str, request_id: str) -> str:
    """The NOTIFY payload (and waiter key) of an entry: _NOTICE in SQL."""
    return f"{app_id} {request_id}"


def _record(key: tuple[str, str], card_ref: str, columns: Sequence[Any]) -> TokenRecord:
    token, jti, expires_at, masked_pan, bin_, card_type, receipt = columns
    facts = (token, jti, expires_at, masked_pan, bin_, card_type, receipt or "")
    return TokenRecord(*key, card_ref, *facts)


@contextlib.asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """Translate driver errors into relay errors that carry no row values."""
    try:
        yield
    except (PoolTimeout, PoolClosed) as exc:
        raise Unavailable("token ledger database is unavailable") from exc
    except psycopg.OperationalError as exc:
        raise Unavailable(
            "token ledger database is unavailable", sqlstate=exc.sqlstate or ""
        ) from None
    except psycopg.Error as exc:
        raise RelayError(
            "token ledger database refused a statement", sqlstate=exc.sqlstate or ""
        ) from None
