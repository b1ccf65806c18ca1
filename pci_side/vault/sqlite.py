"""The SQLite backend: the embedded default, one file, driven from one dedicated thread.

The stdlib sqlite3 module blocks, so every call runs on a single-thread executor that owns the
connection: the event loop never waits on the disk, and because that thread runs one function
at a time, each function is a whole transaction that nothing else on this connection can
interleave with. Writes use BEGIN IMMEDIATE, which takes the database's write lock up front, so
the audit chain's read-head-then-append cannot fork even with several processes on one file
(the CLI beside a worker). WAL lets readers in other processes go on during a write;
busy_timeout makes a writer wait for the lock instead of failing; synchronous=FULL makes every
commit durable; foreign keys are on so a grant never outlives its card.

Lists of keys are passed as one JSON parameter (`json_each`), so no statement is built from
strings and no batch can exceed SQLite's parameter limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from pci_side.vault.audit import (
    AuditEntry,
    AuditHead,
    StoredAuditEntry,
    chain,
    format_at,
    head_mac,
)
from pci_side.vault.errors import VaultStorageError, VaultUnavailable
from pci_side.vault.migrations import SQLITE_MIGRATIONS
from pci_side.vault.store import (
    AUDIT_COLUMNS,
    CARD_COLUMNS,
    CONTEXT_USE_COLUMNS,
    RELEASE_COLUMNS,
    CardRow,
    CardSummary,
    CodeRemoval,
    ContextUse,
    FoundCard,
    ImportItem,
    ReleaseRow,
    Rewrap,
    WrappedDek,
    plan_import,
    versions_in_use,
)
from relay import sqlitedb
from relay.errors import ConfigError
from relay.ratelimit import RateLimiter
from relay.secrets import Secret

__all__ = ["SQLiteStore", "sqlite_path"]

P = ParamSpec("P")
T = TypeVar("T")

BUSY_TIMEOUT_MS: Final = 10_000

_INSERT_CARD: Final = (
    f"INSERT INTO cards ({CARD_COLUMNS}, created_at, updated_at) "  # noqa: S608 - constants
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_GRANT: Final = (
    "INSERT INTO grants (card_ref, merchant_id, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
)
_INSERT_AUDIT: Final = (
    f"INSERT INTO audit_log ({AUDIT_COLUMNS}) "  # noqa: S608 - constants
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SUMMARY_COLUMNS: Final = (
    "card_ref, first6, last4, exp_month, exp_year, card_type, has_security_code, key_version, "
    "created_at, updated_at"
)


def sqlite_path(url: str) -> str:
    """The file a RELAY_VAULT_URL names (relay.sqlitedb's convention)."""
    return sqlitedb.sqlite_path(url, "RELAY_VAULT_URL")


class SQLiteStore:
    """A Store on one SQLite file."""

    def __init__(self, executor: ThreadPoolExecutor, connection: sqlite3.Connection) -> None:
        """Take over an executor and the connection its only thread opened; see `open`."""
        self._executor = executor
        self._connection = connection
        self._buckets: dict[tuple[float, int], RateLimiter] = {}

    @classmethod
    async def open(cls, url: str) -> SQLiteStore:
        """Open (creating if needed) the file and apply migrations."""
        path = sqlite_path(url)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault-sqlite")
        loop = asyncio.get_running_loop()
        try:
            connection = await loop.run_in_executor(executor, _connect, path)
        except (sqlite3.Error, OSError):
            executor.shutdown(wait=False)
            raise ConfigError(
                ["RELAY_VAULT_URL names a SQLite file that cannot be opened"]
            ) from None
        store = cls(executor, connection)
        try:
            await store._run(_migrate, dt.datetime.now(dt.UTC))
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection on its thread, then let the thread end."""
        with contextlib.suppress(sqlite3.Error):
            await self._run(sqlite3.Connection.close)
        self._executor.shutdown(wait=False)

    async def _run(
        self,
        function: Callable[Concatenate[sqlite3.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(function, self._connection, *args, **kwargs)
        try:
            return await loop.run_in_executor(self._executor, call)
        except sqlite3.OperationalError as exc:
            raise VaultUnavailable("vault database is busy or unavailable") from exc
        except sqlite3.Error as exc:
            raise VaultStorageError("vault database refused a statement") from exc

    async def import_cards(self, items: Sequence[ImportItem], now: dt.datetime) -> list[str]:
        """Plan and write a batch of cards and grants in one transaction."""
        return await self._run(_import_cards, items, format_at(now))

    async def find_card(self, card_ref: str, merchant_id: str) -> FoundCard | None:
        """The row and its grant to merchant_id, in one statement."""
        return await self._run(_find_card, card_ref, merchant_id)

    async def add_grant(self, card_ref: str, merchant_id: str, now: dt.datetime) -> bool | None:
        """Grant a card to a merchant."""
        return await self._run(_add_grant, card_ref, merchant_id, format_at(now))

    async def remove_grant(self, card_ref: str, merchant_id: str) -> bool:
        """Remove a grant."""
        return await self._run(_remove_grant, card_ref, merchant_id)

    async def list_cards(self, limit: int, after: str | None) -> list[CardSummary]:
        """A page of card summaries with their merchants, from one read transaction."""
        return await self._run(_list_cards, limit, after or "")

    async def count_cards(self) -> int:
        """The number of cards."""
        return await self._run(_scalar, "SELECT count(*) FROM cards")

    async def deks_to_rewrap(
        self, current_version: int, after: str | None, limit: int
    ) -> list[WrappedDek]:
        """The next rows not on current_version, by card_ref."""
        return await self._run(_deks_to_rewrap, current_version, after or "", limit)

    async def rewrap(self, changes: Sequence[Rewrap], now: dt.datetime) -> int:
        """Compare-and-set each row's wrapped DEK and key version."""
        return await self._run(_rewrap, changes, format_at(now))

    async def append_audit(
        self,
        entries: Sequence[tuple[dt.datetime, AuditEntry]],
        releases: Sequence[ReleaseRow] = (),
        *,
        audit_key: Secret[bytes],
    ) -> list[StoredAuditEntry]:
        """Chain entries onto the head under the write lock; keep the releases with them."""
        return await self._run(_append_audit, audit_key, entries, releases)

    async def audit_after(self, seq: int, limit: int) -> list[StoredAuditEntry]:
        """Entries after seq, ascending."""
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?"  # noqa: S608
        return await self._run(_audit_rows, sql, (seq, limit))

    async def audit_newest(self, limit: int) -> list[StoredAuditEntry]:
        """The newest entries, newest first."""
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT ?"  # noqa: S608
        return await self._run(_audit_rows, sql, (limit,))

    async def audit_head(self) -> AuditHead:
        """The head row."""
        return await self._run(_audit_head)

    async def find_release(self, cc_jti: str) -> ReleaseRow | None:
        """See Store.find_release."""
        return await self._run(_find_release, cc_jti)

    async def kek_checks(self) -> dict[int, str]:
        """See Store.kek_checks."""
        return dict(await self._run(_all_rows, "SELECT version, check_value FROM kek_checks", ()))

    async def record_kek_check(self, version: int, check_value: str, now: dt.datetime) -> None:
        """See Store.record_kek_check."""
        await self._run(
            _all_rows,
            "INSERT INTO kek_checks (version, check_value, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (version) DO NOTHING",
            (version, check_value, format_at(now)),
        )

    async def key_versions_in_use(self, now: dt.datetime) -> dict[int, str]:
        """See Store.key_versions_in_use."""
        rows = await self._run(_all_rows, _VERSIONS_IN_USE, (int(now.timestamp()),))
        return versions_in_use(rows)

    async def sealed_under(self, version: int) -> WrappedDek | ReleaseRow | None:
        """See Store.sealed_under."""
        return await self._run(_sealed_under, version)

    async def claim_contexts(
        self, uses: Sequence[ContextUse], purge_before: int | None
    ) -> list[ContextUse | None]:
        """See Store.claim_contexts."""
        return await self._run(_claim_contexts, uses, purge_before)

    async def unclaim_context(self, use: ContextUse) -> None:
        """See Store.unclaim_context."""
        await self._run(_unclaim_context, use)

    async def fail_context(self, cc_jti: str, reason: str) -> None:
        """See Store.fail_context."""
        await self._run(_fail_context, cc_jti, reason)

    async def take_over_context(self, held: ContextUse, holder: str) -> bool:
        """See Store.take_over_context."""
        return await self._run(_take_over_context, held, holder)

    async def beat(self, instance_id: str) -> None:
        """See Store.beat."""
        await self._run(_beat, instance_id, time.time())

    async def leave(self, instance_id: str) -> None:
        """See Store.leave."""
        await self._run(_leave, instance_id)

    async def silent_for(self, instance_id: str) -> float | None:
        """See Store.silent_for."""
        seen = await self._run(_seen_at, instance_id)
        return None if seen is None else max(0.0, time.time() - seen)

    async def take_rate_token(self, key: str, rate: float, burst: int) -> bool:
        """See Store.take_rate_token: in memory, the file serves one process."""
        limiter = self._buckets.get((rate, burst))
        if limiter is None:
            limiter = self._buckets[(rate, burst)] = RateLimiter(rate, burst)
        return limiter.try_take(key)

    async def card_row(self, card_ref: str) -> CardRow | None:
        """See Store.card_row."""
        return await self._run(_card_row, card_ref)

    async def rows_with_security_code(
        self, created_before: dt.datetime, after: str | None, limit: int
    ) -> list[CardRow]:
        """See Store.rows_with_security_code."""
        return await self._run(_rows_with_code, format_at(created_before), after or "", limit)

    async def remove_security_codes(self, changes: Sequence[CodeRemoval], now: dt.datetime) -> int:
        """Compare-and-set each row's record on its old ciphertext."""
        return await self._run(_remove_codes, changes, format_at(now))


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        # Created owner-only before SQLite opens it (its -wal and -shm files copy the mode):
        # the file holds ciphertext, wrapped keys and fingerprints.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
    connection = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    sqlitedb.use_wal(connection, busy_seconds=BUSY_TIMEOUT_MS / 1000)
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def _migrate(connection: sqlite3.Connection, now: dt.datetime) -> None:
    sqlitedb.migrate(
        connection,
        SQLITE_MIGRATIONS,
        table="schema_version",
        applied_at=format_at(now),
        newer="the vault's schema is newer than this relay: upgrade the relay",
    )


def _import_cards(
    connection: sqlite3.Connection, items: Sequence[ImportItem], stamp: str
) -> list[str]:
    with sqlitedb.transaction(connection):
        refs = json.dumps([item.row.card_ref for item in items])
        fingerprints = json.dumps([item.row.fingerprint for item in items])
        found = connection.execute(
            "SELECT card_ref, fingerprint FROM cards "
            "WHERE card_ref IN (SELECT value FROM json_each(?)) "
            "OR fingerprint IN (SELECT value FROM json_each(?))",
            (refs, fingerprints),
        ).fetchall()
        plan = plan_import(items, dict(found), {fp: ref for ref, fp in found})
        connection.executemany(_INSERT_CARD, [_card_values(row, stamp) for row in plan.cards])
        connection.executemany(_INSERT_GRANT, [(*grant, stamp) for grant in plan.grants])
    return plan.statuses


def _card_values(row: CardRow, stamp: str) -> tuple[Any, ...]:
    return (
        row.card_ref,
        row.first6,
        row.last4,
        row.exp_month,
        row.exp_year,
        row.card_type,
        int(row.has_security_code),
        row.fingerprint,
        row.key_version,
        row.wrapped_dek,
        row.ciphertext,
        stamp,
        stamp,
    )


def _find_card(connection: sqlite3.Connection, card_ref: str, merchant_id: str) -> FoundCard | None:
    found = connection.execute(
        f"SELECT {CARD_COLUMNS}, EXISTS (SELECT 1 FROM grants "  # noqa: S608 - constants
        "WHERE grants.card_ref = cards.card_ref AND grants.merchant_id = ?) "
        "FROM cards WHERE card_ref = ?",
        (merchant_id, card_ref),
    ).fetchone()
    if found is None:
        return None
    *columns, granted = found
    columns[6] = bool(columns[6])
    return FoundCard(CardRow(*columns), bool(granted))


def _add_grant(
    connection: sqlite3.Connection, card_ref: str, merchant_id: str, stamp: str
) -> bool | None:
    # The WHERE makes the insert a no-op for an unknown card (and lets SQLite parse the upsert).
    cursor = connection.execute(
        "INSERT INTO grants (card_ref, merchant_id, created_at) "
        "SELECT card_ref, ?, ? FROM cards WHERE card_ref = ? ON CONFLICT DO NOTHING",
        (merchant_id, stamp, card_ref),
    )
    if cursor.rowcount:
        return True
    exists = connection.execute("SELECT 1 FROM cards WHERE card_ref = ?", (card_ref,)).fetchone()
    return False if exists else None


def _remove_grant(connection: sqlite3.Connection, card_ref: str, merchant_id: str) -> bool:
    cursor = connection.execute(
        "DELETE FROM grants WHERE card_ref = ? AND merchant_id = ?", (card_ref, merchant_id)
    )
    return cursor.rowcount > 0


def _list_cards(connection: sqlite3.Connection, limit: int, after: str) -> list[CardSummary]:
    with sqlitedb.transaction(connection, "DEFERRED"):
        rows = connection.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM cards WHERE card_ref > ? "  # noqa: S608 - constants
            "ORDER BY card_ref LIMIT ?",
            (after, limit),
        ).fetchall()
        refs = json.dumps([row[0] for row in rows])
        grants = connection.execute(
            "SELECT card_ref, merchant_id FROM grants "
            "WHERE card_ref IN (SELECT value FROM json_each(?)) ORDER BY card_ref, merchant_id",
            (refs,),
        ).fetchall()
    merchants: dict[str, list[str]] = {}
    for card_ref, merchant_id in grants:
        merchants.setdefault(card_ref, []).append(merchant_id)
    return [_summary(row, tuple(merchants.get(row[0], ()))) for row in rows]


def _summary(row: tuple[Any, ...], merchants: tuple[str, ...]) -> CardSummary:
    ref, first6, last4, month, year, card_type, has_code, version, created, updated = row
    return CardSummary(
        ref,
        first6,
        last4,
        month,
        year,
        card_type,
        bool(has_code),
        version,
        merchants,
        dt.datetime.fromisoformat(created),
        dt.datetime.fromisoformat(updated),
    )


def _keep_releases(
    connection: sqlite3.Connection, releases: Sequence[ReleaseRow], now: dt.datetime
) -> None:
    connection.execute("DELETE FROM releases WHERE expires_at <= ?", (int(now.timestamp()),))
    connection.executemany(
        f"INSERT INTO releases ({RELEASE_COLUMNS}) "  # noqa: S608 - constants
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cc_jti) DO NOTHING",
        [dataclasses.astuple(row) for row in releases],
    )


def _find_release(connection: sqlite3.Connection, cc_jti: str) -> ReleaseRow | None:
    found = connection.execute(
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE cc_jti = ?",  # noqa: S608 - constants
        (cc_jti,),
    ).fetchone()
    return None if found is None else ReleaseRow(*found)


def _claim_contexts(
    connection: sqlite3.Connection, uses: Sequence[ContextUse], purge_before: int | None
) -> list[ContextUse | None]:
    held: list[ContextUse | None] = []
    with sqlitedb.transaction(connection):
        if purge_before is not None:
            connection.execute("DELETE FROM cc_uses WHERE expires_at < ?", (purge_before,))
        for use in uses:
            inserted = connection.execute(
                f"INSERT INTO cc_uses ({CONTEXT_USE_COLUMNS}) "  # noqa: S608 - constants
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (cc_jti) DO NOTHING",
                dataclasses.astuple(use),
            ).rowcount
            if inserted:
                held.append(None)
                continue
            row = connection.execute(
                f"SELECT {CONTEXT_USE_COLUMNS} FROM cc_uses WHERE cc_jti = ?",  # noqa: S608
                (use.cc_jti,),
            ).fetchone()
            held.append(ContextUse(*row))
    return held


def _unclaim_context(connection: sqlite3.Connection, use: ContextUse) -> None:
    with sqlitedb.transaction(connection):
        connection.execute(
            "DELETE FROM cc_uses WHERE cc_jti = ? AND holder = ? AND failed_reason = ''",
            (use.cc_jti, use.holder),
        )


def _fail_context(connection: sqlite3.Connection, cc_jti: str, reason: str) -> None:
    with sqlitedb.transaction(connection):
        connection.execute(
            "UPDATE cc_uses SET failed_reason = ? WHERE cc_jti = ?", (reason, cc_jti)
        )


def _take_over_context(connection: sqlite3.Connection, held: ContextUse, holder: str) -> bool:
    with sqlitedb.transaction(connection):
        taken = connection.execute(
            "UPDATE cc_uses SET holder = ? WHERE cc_jti = ? AND holder = ? AND failed_reason = ''",
            (holder, held.cc_jti, held.holder),
        ).rowcount
    return taken == 1


def _beat(connection: sqlite3.Connection, instance_id: str, now: float) -> None:
    with sqlitedb.transaction(connection):
        connection.execute(
            "INSERT INTO pci_instances (instance_id, seen_at) VALUES (?, ?) "
            "ON CONFLICT (instance_id) DO UPDATE SET seen_at = excluded.seen_at",
            (instance_id, now),
        )


def _leave(connection: sqlite3.Connection, instance_id: str) -> None:
    with sqlitedb.transaction(connection):
        connection.execute("DELETE FROM pci_instances WHERE instance_id = ?", (instance_id,))


def _seen_at(connection: sqlite3.Connection, instance_id: str) -> float | None:
    row = connection.execute(
        "SELECT seen_at FROM pci_instances WHERE instance_id = ?", (instance_id,)
    ).fetchone()
    return None if row is None else float(row[0])


def _scalar(connection: sqlite3.Connection, sql: str) -> int:
    value = connection.execute(sql).fetchone()[0]
    assert isinstance(value, int)
    return value


def _deks_to_rewrap(
    connection: sqlite3.Connection, current_version: int, after: str, limit: int
) -> list[WrappedDek]:
    rows = connection.execute(
        "SELECT card_ref, key_version, wrapped_dek FROM cards "
        "WHERE key_version <> ? AND card_ref > ? ORDER BY card_ref LIMIT ?",
        (current_version, after, limit),
    ).fetchall()
    return [WrappedDek(*row) for row in rows]


def _rewrap(connection: sqlite3.Connection, changes: Sequence[Rewrap], stamp: str) -> int:
    with sqlitedb.transaction(connection):
        cursor = connection.executemany(
            "UPDATE cards SET wrapped_dek = ?, key_version = ?, updated_at = ? "
            "WHERE card_ref = ? AND key_version = ?",
            [
                (change.wrapped_dek, change.new_version, stamp, change.card_ref, change.old_version)
                for change in changes
            ],
        )
        return cursor.rowcount


def _append_audit(
    connection: sqlite3.Connection,
    audit_key: Secret[bytes],
    entries: Sequence[tuple[dt.datetime, AuditEntry]],
    releases: Sequence[ReleaseRow],
) -> list[StoredAuditEntry]:
    if not entries:
        return []
    with sqlitedb.transaction(connection):
        if releases:
            _keep_releases(connection, releases, entries[0][0])
        seq, head, _ = _audit_head(connection)
        stored = chain(audit_key, seq, head, entries)
        connection.executemany(_INSERT_AUDIT, [_audit_values(item) for item in stored])
        last = stored[-1]
        connection.execute(
            "UPDATE audit_head SET seq = ?, hash = ?, mac = ? WHERE id = 1",
            (last.seq, last.hash, head_mac(audit_key, last.seq, last.hash)),
        )
    return stored


def _audit_values(item: StoredAuditEntry) -> tuple[Any, ...]:
    entry = item.entry
    return (
        item.seq,
        format_at(item.at),
        entry.merchant_id,
        entry.card_ref,
        entry.request_id,
        entry.cc_jti,
        entry.tt_jti,
        entry.outcome,
        entry.reason,
        entry.actor,
        entry.detail,
        item.prev_hash,
        item.hash,
    )


def _audit_rows(
    connection: sqlite3.Connection, sql: str, params: tuple[int, ...]
) -> list[StoredAuditEntry]:
    return [_stored_entry(row) for row in connection.execute(sql, params).fetchall()]


def _stored_entry(row: tuple[Any, ...]) -> StoredAuditEntry:
    seq, at, *fields, prev_hash, hash_ = row
    return StoredAuditEntry(
        seq, dt.datetime.fromisoformat(at), AuditEntry(*fields), prev_hash, hash_
    )


def _audit_head(connection: sqlite3.Connection) -> AuditHead:
    seq, head, mac = connection.execute(
        "SELECT seq, hash, mac FROM audit_head WHERE id = 1"
    ).fetchone()
    return int(seq), str(head), str(mac)


def _card_row(connection: sqlite3.Connection, card_ref: str) -> CardRow | None:
    found = connection.execute(
        f"SELECT {CARD_COLUMNS} FROM cards WHERE card_ref = ?",  # noqa: S608 - constants
        (card_ref,),
    ).fetchone()
    return None if found is None else _card_row_of(found)


def _card_row_of(columns: tuple[Any, ...]) -> CardRow:
    ref, first6, last4, month, year, card_type, has_code, *rest = columns
    return CardRow(ref, first6, last4, month, year, card_type, bool(has_code), *rest)


def _rows_with_code(
    connection: sqlite3.Connection, created_before: str, after: str, limit: int
) -> list[CardRow]:
    # created_at is format_at text, fixed width in UTC: text order is time order.
    rows = connection.execute(
        f"SELECT {CARD_COLUMNS} FROM cards "  # noqa: S608 - constants
        "WHERE has_security_code = 1 AND created_at <= ? AND card_ref > ? "
        "ORDER BY card_ref LIMIT ?",
        (created_before, after, limit),
    ).fetchall()
    return [_card_row_of(row) for row in rows]


def _remove_codes(
    connection: sqlite3.Connection, changes: Sequence[CodeRemoval], stamp: str
) -> int:
    with sqlitedb.transaction(connection):
        cursor = connection.executemany(
            "UPDATE cards SET ciphertext = ?, has_security_code = 0, updated_at = ? "
            "WHERE card_ref = ? AND ciphertext = ?",
            [(c.ciphertext, stamp, c.card_ref, c.old_ciphertext) for c in changes],
        )
        return cursor.rowcount


_VERSIONS_IN_USE: Final = (
    "SELECT 'kept releases', key_version FROM releases WHERE expires_at > ? "
    "UNION SELECT 'cards', key_version FROM cards"
)


def _all_rows(
    connection: sqlite3.Connection, sql: str, params: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    return connection.execute(sql, params).fetchall()


def _sealed_under(connection: sqlite3.Connection, version: int) -> WrappedDek | ReleaseRow | None:
    card = connection.execute(
        "SELECT card_ref, key_version, wrapped_dek FROM cards WHERE key_version = ? LIMIT 1",
        (version,),
    ).fetchone()
    if card is not None:
        return WrappedDek(*card)
    release = connection.execute(
        f"SELECT {RELEASE_COLUMNS} FROM releases WHERE key_version = ? LIMIT 1",  # noqa: S608
        (version,),
    ).fetchone()
    return None if release is None else ReleaseRow(*release)
