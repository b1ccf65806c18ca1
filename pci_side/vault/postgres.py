"""The PostgreSQL backend: psycopg 3, async, behind one connection pool.

Pool connections are in autocommit mode: a single statement is its own transaction and every
multi-statement write says `conn.transaction()` explicitly, so no connection is ever handed
back with a transaction left open. Serialization points, each inside the transaction it guards:

- migrations take a transaction-level advisory lock, so two processes opening at once apply
  each migration once;
- an import takes `LOCK TABLE cards IN SHARE ROW EXCLUSIVE MODE` (it conflicts with itself and
  with writes, never with reads), so two imports cannot both decide that a card_ref is new;
- an audit append takes the head row `FOR UPDATE`, so the chain never forks.

Driver errors are translated once, here: an unreachable server or pool timeout becomes
VaultUnavailable (retryable), anything else VaultStorageError; the driver's error, which may
quote column values, is only chained as the cause.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pci_side.vault.audit import AuditEntry, StoredAuditEntry, chain
from pci_side.vault.errors import VaultStorageError, VaultUnavailable
from pci_side.vault.migrations import POSTGRES_MIGRATIONS
from pci_side.vault.store import (
    AUDIT_COLUMNS,
    CARD_COLUMNS,
    RELEASE_COLUMNS,
    CardRow,
    CardSummary,
    FoundCard,
    ImportItem,
    ReleaseRow,
    Rewrap,
    WrappedDek,
    plan_import,
)
from relay.errors import ConfigError

__all__ = ["PostgresStore"]

Connection = psycopg.AsyncConnection[tuple[Any, ...]]

MIGRATION_LOCK: Final = 0x72656C61795F7631  # "relay_v1": the advisory lock key of migrations
OPEN_TIMEOUT_SECONDS: Final = 30.0

_INSERT_CARD: Final = (
    f"INSERT INTO cards ({CARD_COLUMNS}, created_at, updated_at) "  # noqa: S608 - constants
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_INSERT_GRANT: Final = (
    "INSERT INTO grants (card_ref, merchant_id, created_at) VALUES (%s, %s, %s) "
    "ON CONFLICT DO NOTHING"
)
_INSERT_AUDIT: Final = (
    f"INSERT INTO audit_log ({AUDIT_COLUMNS}) "  # noqa: S608 - constants
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SUMMARY_COLUMNS: Final = (
    "card_ref, first6, last4, exp_month, exp_year, card_type, has_security_code, key_version, "
    "created_at, updated_at"
)


class PostgresStore:
    """A Store on a PostgreSQL database."""

    def __init__(self, pool: AsyncConnectionPool[Connection]) -> None:
        """Take over an open pool; see `open`."""
        self._pool = pool

    @classmethod
    async def open(
        cls, url: str, pool_size: int, *, open_timeout: float = OPEN_TIMEOUT_SECONDS
    ) -> PostgresStore:
        """Open the pool (pool_size connections, within open_timeout s) and apply migrations."""
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=pool_size,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            check=AsyncConnectionPool.check_connection,
            name="relay-vault",
        )
        try:
            await pool.open(wait=True, timeout=open_timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise VaultUnavailable("vault database unreachable: check RELAY_VAULT_URL") from exc
        store = cls(pool)
        try:
            await store._migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.connection() as connection:
                yield connection
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise VaultUnavailable("vault database is unavailable") from exc
        except psycopg.Error as exc:
            raise VaultStorageError("vault database refused a statement") from exc

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cursor = await conn.execute("SELECT version FROM schema_version")
            applied = {row[0] for row in await cursor.fetchall()}
            if applied - {version for version, _ in POSTGRES_MIGRATIONS}:
                raise ConfigError(
                    ["the vault's schema is newer than this relay: upgrade the relay"]
                )
            for version, statements in POSTGRES_MIGRATIONS:
                if version not in applied:
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_version (version) VALUES (%s)", (version,)
                    )

    async def import_cards(self, items: Sequence[ImportItem], now: dt.datetime) -> list[str]:
        """Plan and write a batch of cards and grants in one transaction."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("LOCK TABLE cards IN SHARE ROW EXCLUSIVE MODE")
            cursor = await conn.execute(
                "SELECT card_ref, fingerprint FROM cards "
                "WHERE card_ref = ANY(%s) OR fingerprint = ANY(%s)",
                ([item.row.card_ref for item in items], [item.row.fingerprint for item in items]),
            )
            found = await cursor.fetchall()
            plan = plan_import(items, dict(found), {fp: ref for ref, fp in found})
            async with conn.cursor() as writer:
                if plan.cards:
                    await writer.executemany(
                        _INSERT_CARD, [_card_values(row, now) for row in plan.cards]
                    )
                if plan.grants:
                    await writer.executemany(_INSERT_GRANT, [(*g, now) for g in plan.grants])
        return plan.statuses

    async def find_card(self, card_ref: str, merchant_id: str) -> FoundCard | None:
        """The row and its grant to merchant_id, in one statement."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {CARD_COLUMNS}, EXISTS (SELECT 1 FROM grants "  # noqa: S608
                "WHERE grants.card_ref = cards.card_ref AND grants.merchant_id = %s) "
                "FROM cards WHERE card_ref = %s",
                (merchant_id, card_ref),
            )
            found = await cursor.fetchone()
        if found is None:
            return None
        *columns, granted = found
        return FoundCard(CardRow(*columns), bool(granted))

    async def add_grant(self, card_ref: str, merchant_id: str, now: dt.datetime) -> bool | None:
        """Grant a card to a merchant; the SELECT makes it a no-op for an unknown card."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO grants (card_ref, merchant_id, created_at) "
                "SELECT card_ref, %s, %s FROM cards WHERE card_ref = %s ON CONFLICT DO NOTHING",
                (merchant_id, now, card_ref),
            )
            if cursor.rowcount:
                return True
            cursor = await conn.execute("SELECT 1 FROM cards WHERE card_ref = %s", (card_ref,))
            return False if await cursor.fetchone() else None

    async def remove_grant(self, card_ref: str, merchant_id: str) -> bool:
        """Remove a grant."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM grants WHERE card_ref = %s AND merchant_id = %s",
                (card_ref, merchant_id),
            )
            return cursor.rowcount > 0

    async def list_cards(self, limit: int, after: str | None) -> list[CardSummary]:
        """A page of card summaries with their merchants, in one statement."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_SUMMARY_COLUMNS}, ARRAY(SELECT merchant_id FROM grants "  # noqa: S608
                "WHERE grants.card_ref = cards.card_ref ORDER BY merchant_id) "
                "FROM cards WHERE card_ref > %s ORDER BY card_ref LIMIT %s",
                (after or "", limit),
            )
            rows = await cursor.fetchall()
        return [_summary(row) for row in rows]

    async def count_cards(self) -> int:
        """The number of cards."""
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT count(*) FROM cards")
            found = await cursor.fetchone()
        assert found is not None
        return int(found[0])

    async def deks_to_rewrap(
        self, current_version: int, after: str | None, limit: int
    ) -> list[WrappedDek]:
        """The next rows not on current_version, by card_ref."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT card_ref, key_version, wrapped_dek FROM cards "
                "WHERE key_version <> %s AND card_ref > %s ORDER BY card_ref LIMIT %s",
                (current_version, after or "", limit),
            )
            rows = await cursor.fetchall()
        return [WrappedDek(ref, version, bytes(wrapped)) for ref, version, wrapped in rows]

    async def rewrap(self, changes: Sequence[Rewrap], now: dt.datetime) -> int:
        """Compare-and-set each row's wrapped DEK and key version."""
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(
                "UPDATE cards SET wrapped_dek = %s, key_version = %s, updated_at = %s "
                "WHERE card_ref = %s AND key_version = %s",
                [(c.wrapped_dek, c.new_version, now, c.card_ref, c.old_version) for c in changes],
            )
            return cursor.rowcount

    async def append_audit(
        self,
        entries: Sequence[tuple[dt.datetime, AuditEntry]],
        releases: Sequence[ReleaseRow] = (),
    ) -> list[StoredAuditEntry]:
        """Chain entries onto the head, which is locked FOR UPDATE until commit."""
        if not entries:
            return []
        async with self._connection() as conn, conn.transaction():
            # The head lock first: every append, releases included, then queues in one order.
            cursor = await conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            head = await cursor.fetchone()
            assert head is not None
            if releases:
                await _keep_releases(conn, releases, entries[0][0])
            stored = chain(int(head[0]), str(head[1]), entries)
            async with conn.cursor() as writer:
                await writer.executemany(_INSERT_AUDIT, [_audit_values(item) for item in stored])
            await conn.execute(
                "UPDATE audit_head SET seq = %s, hash = %s WHERE id = 1",
                (stored[-1].seq, stored[-1].hash),
            )
        return stored

    async def audit_after(self, seq: int, limit: int) -> list[StoredAuditEntry]:
        """Entries after seq, ascending."""
        return await self._audit_rows(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > %s ORDER BY seq LIMIT %s",  # noqa: S608
            (seq, limit),
        )

    async def audit_newest(self, limit: int) -> list[StoredAuditEntry]:
        """The newest entries, newest first."""
        return await self._audit_rows(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT %s",  # noqa: S608
            (limit,),
        )

    async def _audit_rows(self, sql: str, params: tuple[int, ...]) -> list[StoredAuditEntry]:
        async with self._connection() as conn:
            cursor = await conn.execute(sql, params)
            rows = await cursor.fetchall()
        return [_stored_entry(row) for row in rows]

    async def audit_head(self) -> tuple[int, str]:
        """The head row."""
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
            head = await cursor.fetchone()
        assert head is not None
        return int(head[0]), str(head[1])

    async def find_release(self, cc_jti: str) -> ReleaseRow | None:
        """See Store.find_release."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {RELEASE_COLUMNS} FROM releases WHERE cc_jti = %s",  # noqa: S608
                (cc_jti,),
            )
            found = await cursor.fetchone()
        if found is None:
            return None
        cc_jti, merchant_id, request_id, card_ref, tt_jti, expires_at, version, sealed = found
        return ReleaseRow(
            cc_jti, merchant_id, request_id, card_ref, tt_jti, expires_at, version, bytes(sealed)
        )


async def _keep_releases(
    conn: Connection, releases: Sequence[ReleaseRow], now: dt.datetime
) -> None:
    await conn.execute("DELETE FROM releases WHERE expires_at <= %s", (int(now.timestamp()),))
    async with conn.cursor() as writer:
        await writer.executemany(
            f"INSERT INTO releases ({RELEASE_COLUMNS}) "  # noqa: S608 - constants
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (cc_jti) DO NOTHING",
            [dataclasses.astuple(row) for row in releases],
        )


def _card_values(row: CardRow, now: dt.datetime) -> tuple[Any, ...]:
    return (
        row.card_ref,
        row.first6,
        row.last4,
        row.exp_month,
        row.exp_year,
        row.card_type,
        row.has_security_code,
        row.fingerprint,
        row.key_version,
        row.wrapped_dek,
        row.ciphertext,
        now,
        now,
    )


def _summary(row: tuple[Any, ...]) -> CardSummary:
    ref, first6, last4, month, year, card_type, has_code, version, created, updated, merchants = row
    return CardSummary(
        ref,
        first6,
        last4,
        month,
        year,
        card_type,
        bool(has_code),
        version,
        tuple(merchants),
        created.astimezone(dt.UTC),
        updated.astimezone(dt.UTC),
    )


def _audit_values(item: StoredAuditEntry) -> tuple[Any, ...]:
    entry = item.entry
    return (
        item.seq,
        item.at,
        entry.merchant_id,
        entry.card_ref,
        entry.request_id,
        entry.cc_jti,
        entry.tt_jti,
        entry.outcome,
        entry.reason,
        item.prev_hash,
        item.hash,
    )


def _stored_entry(row: tuple[Any, ...]) -> StoredAuditEntry:
    seq, at, *fields, prev_hash, hash_ = row
    return StoredAuditEntry(int(seq), at.astimezone(dt.UTC), AuditEntry(*fields), prev_hash, hash_)
