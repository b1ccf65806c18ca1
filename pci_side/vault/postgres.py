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

from pci_side.vault.audit import AuditEntry, AuditHead, StoredAuditEntry, chain, head_mac
from pci_side.vault.errors import VaultStorageError, VaultUnavailable
from pci_side.vault.migrations import POSTGRES_MIGRATIONS
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
from relay.errors import ConfigError
from relay.secrets import Secret

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
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
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
        *,
        audit_key: Secret[bytes],
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
            stored = chain(audit_key, int(head[0]), str(head[1]), entries)
            async with conn.cursor() as writer:
                await writer.executemany(_INSERT_AUDIT, [_audit_values(item) for item in stored])
            last = stored[-1]
            await conn.execute(
                "UPDATE audit_head SET seq = %s, hash = %s, mac = %s WHERE id = 1",
                (last.seq, last.hash, head_mac(audit_key, last.seq, last.hash)),
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

    async def audit_head(self) -> AuditHead:
        """The head row."""
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT seq, hash, mac FROM audit_head WHERE id = 1")
            head = await cursor.fetchone()
        assert head is not None
        return int(head[0]), str(head[1]), str(head[2])

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

    async def kek_checks(self) -> dict[int, str]:
        """See Store.kek_checks."""
        async with self._connection() as conn:
            cursor = await conn.execute("SELECT version, check_value FROM kek_checks")
            rows = await cursor.fetchall()
        return {int(version): str(value) for version, value in rows}

    async def record_kek_check(self, version: int, check_value: str, now: dt.datetime) -> None:
        """See Store.record_kek_check."""
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO kek_checks (version, check_value, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (version) DO NOTHING",
                (version, check_value, now),
            )

    async def key_versions_in_use(self, now: dt.datetime) -> dict[int, str]:
        """See Store.key_versions_in_use."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT 'kept releases', key_version FROM releases WHERE expires_at > %s "
                "UNION SELECT 'cards', key_version FROM cards",
                (int(now.timestamp()),),
            )
            rows = await cursor.fetchall()
        return versions_in_use([(str(where), int(version)) for where, version in rows])

    async def sealed_under(self, version: int) -> WrappedDek | ReleaseRow | None:
        """See Store.sealed_under."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT card_ref, key_version, wrapped_dek FROM cards "
                "WHERE key_version = %s LIMIT 1",
                (version,),
            )
            card, release = await cursor.fetchone(), None
            if card is None:
                cursor = await conn.execute(
                    "SELECT cc_jti FROM releases WHERE key_version = %s LIMIT 1", (version,)
                )
                release = await cursor.fetchone()
        if card is not None:
            return WrappedDek(card[0], card[1], bytes(card[2]))
        return None if release is None else await self.find_release(str(release[0]))

    async def claim_contexts(
        self, uses: Sequence[ContextUse], purge_before: int | None
    ) -> list[ContextUse | None]:
        """See Store.claim_contexts: one statement, which also locks the rows it finds held.

        A conflict is answered from the row the statement itself found (locked by a no-op
        update), so a holder giving its context back meanwhile cannot leave a use unanswered.
        """
        firsts: dict[str, ContextUse] = {}
        for use in uses:
            firsts.setdefault(use.cc_jti, use)  # one row per jti per statement
        rows = [dataclasses.astuple(use) for use in firsts.values()]
        columns = [list(column) for column in zip(*rows, strict=True)]
        async with self._connection() as conn, conn.transaction():
            if purge_before is not None:
                await conn.execute("DELETE FROM cc_uses WHERE expires_at < %s", (purge_before,))
            cursor = await conn.execute(_CLAIM_CONTEXTS, columns)
            found = {
                row[0]: (ContextUse(*row[:-1]), bool(row[-1])) for row in await cursor.fetchall()
            }
        held: list[ContextUse | None] = []
        for use in uses:
            holder, inserted = found[use.cc_jti]
            held.append(None if inserted and firsts[use.cc_jti] is use else holder)
        return held

    async def unclaim_context(self, use: ContextUse) -> None:
        """See Store.unclaim_context."""
        async with self._connection() as conn:
            await conn.execute(
                "DELETE FROM cc_uses WHERE cc_jti = %s AND holder = %s AND failed_reason = ''",
                (use.cc_jti, use.holder),
            )

    async def fail_context(self, cc_jti: str, reason: str) -> None:
        """See Store.fail_context."""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE cc_uses SET failed_reason = %s WHERE cc_jti = %s", (reason, cc_jti)
            )

    async def take_over_context(self, held: ContextUse, holder: str) -> bool:
        """See Store.take_over_context."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE cc_uses SET holder = %s "
                "WHERE cc_jti = %s AND holder = %s AND failed_reason = ''",
                (holder, held.cc_jti, held.holder),
            )
            return cursor.rowcount == 1

    async def beat(self, instance_id: str) -> None:
        """See Store.beat: on the database's clock, which every replica reads alike."""
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO pci_instances (instance_id, seen_at) "
                "VALUES (%s, EXTRACT(EPOCH FROM clock_timestamp())) "
                "ON CONFLICT (instance_id) DO UPDATE SET seen_at = EXCLUDED.seen_at",
                (instance_id,),
            )

    async def leave(self, instance_id: str) -> None:
        """See Store.leave."""
        async with self._connection() as conn:
            await conn.execute("DELETE FROM pci_instances WHERE instance_id = %s", (instance_id,))

    async def silent_for(self, instance_id: str) -> float | None:
        """See Store.silent_for."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp()) - seen_at) "
                "FROM pci_instances WHERE instance_id = %s",
                (instance_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else float(row[0])

    async def take_rate_token(self, key: str, rate: float, burst: int) -> bool:
        """See Store.take_rate_token: one statement, on the database's clock, for all replicas.

        The bucket refills from its last successful take; an empty bucket is left as it was.
        """
        async with self._connection() as conn:
            cursor = await conn.execute(_TAKE_FROM_BUCKET, (key, burst, burst, rate, burst, rate))
            return await cursor.fetchone() is not None

    async def card_row(self, card_ref: str) -> CardRow | None:
        """See Store.card_row."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {CARD_COLUMNS} FROM cards WHERE card_ref = %s",  # noqa: S608 - constants
                (card_ref,),
            )
            found = await cursor.fetchone()
        return None if found is None else _card_row(found)

    async def rows_with_security_code(
        self, created_before: dt.datetime, after: str | None, limit: int
    ) -> list[CardRow]:
        """See Store.rows_with_security_code."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {CARD_COLUMNS} FROM cards "  # noqa: S608 - constants
                "WHERE has_security_code AND created_at <= %s AND card_ref > %s "
                "ORDER BY card_ref LIMIT %s",
                (created_before, after or "", limit),
            )
            rows = await cursor.fetchall()
        return [_card_row(row) for row in rows]

    async def remove_security_codes(self, changes: Sequence[CodeRemoval], now: dt.datetime) -> int:
        """Compare-and-set each row's record on its old ciphertext."""
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(
                "UPDATE cards SET ciphertext = %s, has_security_code = false, updated_at = %s "
                "WHERE card_ref = %s AND ciphertext = %s",
                [(c.ciphertext, now, c.card_ref, c.old_ciphertext) for c in changes],
            )
            return cursor.rowcount


def _card_row(columns: tuple[Any, ...]) -> CardRow:
    return CardRow(*columns)  # psycopg gives bytea as bytes, as find_card relies on


_CLAIM_CONTEXTS: Final = f"""
INSERT INTO cc_uses AS u ({CONTEXT_USE_COLUMNS})
SELECT * FROM unnest(
    %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[],
    %s::text[]
)
ON CONFLICT (cc_jti) DO UPDATE SET holder = u.holder
RETURNING {CONTEXT_USE_COLUMNS}, (xmax = 0)
"""  # noqa: S608 - constants
"""Inserted rows come back with true; held ones (updated to themselves, so locked) with false."""

_TAKE_FROM_BUCKET: Final = """
INSERT INTO rate_buckets AS b (merchant_id, tokens, updated_at)
VALUES (%s, %s - 1, EXTRACT(EPOCH FROM clock_timestamp()))
ON CONFLICT (merchant_id) DO UPDATE
SET tokens = LEAST(%s, b.tokens + (EXCLUDED.updated_at - b.updated_at) * %s) - 1,
    updated_at = EXCLUDED.updated_at
WHERE LEAST(%s, b.tokens + (EXCLUDED.updated_at - b.updated_at) * %s) >= 1
RETURNING tokens
"""


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
        entry.actor,
        entry.detail,
        item.prev_hash,
        item.hash,
    )


def _stored_entry(row: tuple[Any, ...]) -> StoredAuditEntry:
    seq, at, *fields, prev_hash, hash_ = row
    return StoredAuditEntry(int(seq), at.astimezone(dt.UTC), AuditEntry(*fields), prev_hash, hash_)
