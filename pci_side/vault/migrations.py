"""Schema migrations of both backends, applied in order when a vault opens.

Each migration is a version number and its statements. A backend applies the missing ones in
one transaction that first takes its migration lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: a
transaction-level advisory lock), records each version in `schema_version`, and commits: so
opening is idempotent and two processes opening one vault at once apply each migration once.

The audit log is append-only twice over: triggers refuse UPDATE and DELETE (and TRUNCATE on
PostgreSQL) of its rows, and the hash chain detects what gets past them (someone who drops the
triggers). In production the vault's database role should also have only SELECT and INSERT on
audit_log. The head row (audit_head) is updated in the same transaction as each append and may
only move forward. PostgreSQL text keys use the "C" collation, so card_ref order (and keyset
pagination) is byte order on both backends, whatever the database's locale.

Migration 2 adds `releases`: the transient token each capture context released, sealed under the
KEK, kept until the token expires, so a repeat under that context reaching any replica, or one
restarted, gets that token back instead of a second tokenization.

Migration 5 adds `kek_checks`: each KEK version's check value (HMAC-SHA256 of a fixed label under
the key), recorded when the version first seals something, so a vault opened with the wrong key
under a version says so at start instead of calling every row tampered with.

Migration 4 adds `cc_uses`: each capture context jti PciRelay accepted, for which request, held
by which PciRelay process, until the context expires, so that one context releases at most one
card across every replica (the primary key is the arbiter); and `pci_instances`, each running
PciRelay process's heartbeat, by which a replica tells a dead holder of a context from a live
one. On PostgreSQL it also adds `rate_buckets`, the per-merchant token buckets that all replicas
share (a SQLite vault serves one process, which keeps its buckets in memory).

Migration 3 adds `actor` and `detail` to audit_log, for refusals and administrative actions, and
comes with the keyed chain: from it on, each hash is an HMAC-SHA256 under the audit key
(RELAY_VAULT_AUDIT_KEY_FILE; see audit.py). Rows chained before it (plain SHA-256) fail
verification at seq 1: no vault was deployed before this change, so none is rewritten.
"""

from __future__ import annotations

from typing import Final

__all__ = ["POSTGRES_MIGRATIONS", "SQLITE_MIGRATIONS", "Migration"]

Migration = tuple[int, tuple[str, ...]]

_GENESIS: Final = "'" + "0" * 64 + "'"

SQLITE_MIGRATIONS: Final[tuple[Migration, ...]] = (
    (
        1,
        (
            """CREATE TABLE cards (
                card_ref TEXT PRIMARY KEY,
                first6 TEXT NOT NULL,
                last4 TEXT NOT NULL,
                exp_month INTEGER NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
                exp_year INTEGER NOT NULL,
                card_type TEXT,
                has_security_code INTEGER NOT NULL CHECK (has_security_code IN (0, 1)),
                fingerprint TEXT NOT NULL UNIQUE,
                key_version INTEGER NOT NULL,
                wrapped_dek BLOB NOT NULL,
                ciphertext BLOB NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            ) STRICT""",
            "CREATE INDEX cards_key_version ON cards (key_version)",
            """CREATE TABLE grants (
                card_ref TEXT NOT NULL REFERENCES cards (card_ref) ON DELETE CASCADE,
                merchant_id TEXT NOT NULL,
                created_at TEXT NOT NULL,
                PRIMARY KEY (card_ref, merchant_id)
            ) STRICT, WITHOUT ROWID""",
            "CREATE INDEX grants_merchant ON grants (merchant_id)",
            """CREATE TABLE audit_log (
                seq INTEGER PRIMARY KEY,
                at TEXT NOT NULL,
                merchant_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                request_id TEXT NOT NULL,
                cc_jti TEXT NOT NULL,
                tt_jti TEXT NOT NULL,
                outcome TEXT NOT NULL,
                reason TEXT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL
            ) STRICT""",
            """CREATE TABLE audit_head (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                seq INTEGER NOT NULL,
                hash TEXT NOT NULL
            ) STRICT""",
            f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, {_GENESIS})",  # noqa: S608 - constant
            """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
               BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
            """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
               BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END""",
            """CREATE TRIGGER audit_head_forward BEFORE UPDATE ON audit_head
               WHEN NEW.seq <= OLD.seq
               BEGIN SELECT RAISE(ABORT, 'audit_head only moves forward'); END""",
            """CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
               BEGIN SELECT RAISE(ABORT, 'audit_head is permanent'); END""",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE releases (
                cc_jti TEXT PRIMARY KEY,
                merchant_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                tt_jti TEXT NOT NULL,
                expires_at INTEGER NOT NULL,
                key_version INTEGER NOT NULL,
                sealed_token BLOB NOT NULL
            ) STRICT""",
            "CREATE INDEX releases_expiry ON releases (expires_at)",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE audit_log ADD COLUMN actor TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE audit_log ADD COLUMN detail TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE audit_head ADD COLUMN mac TEXT NOT NULL DEFAULT ''",
        ),
    ),
    (
        4,
        (
            """CREATE TABLE cc_uses (
                cc_jti TEXT PRIMARY KEY,
                merchant_id TEXT NOT NULL,
                app_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                expires_at INTEGER NOT NULL,
                holder TEXT NOT NULL,
                failed_reason TEXT NOT NULL DEFAULT ''
            ) STRICT""",
            "CREATE INDEX cc_uses_expiry ON cc_uses (expires_at)",
            """CREATE TABLE pci_instances (
                instance_id TEXT PRIMARY KEY,
                seen_at REAL NOT NULL
            ) STRICT""",
        ),
    ),
    (
        5,
        (
            """CREATE TABLE kek_checks (
                version INTEGER PRIMARY KEY,
                check_value TEXT NOT NULL,
                created_at TEXT NOT NULL
            ) STRICT""",
        ),
    ),
)

POSTGRES_MIGRATIONS: Final[tuple[Migration, ...]] = (
    (
        1,
        (
            """CREATE TABLE cards (
                card_ref TEXT COLLATE "C" PRIMARY KEY,
                first6 TEXT NOT NULL,
                last4 TEXT NOT NULL,
                exp_month INTEGER NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
                exp_year INTEGER NOT NULL,
                card_type TEXT,
                has_security_code BOOLEAN NOT NULL,
                fingerprint TEXT NOT NULL UNIQUE,
                key_version INTEGER NOT NULL,
                wrapped_dek BYTEA NOT NULL,
                ciphertext BYTEA NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX cards_key_version ON cards (key_version)",
            """CREATE TABLE grants (
                card_ref TEXT COLLATE "C" NOT NULL REFERENCES cards (card_ref) ON DELETE CASCADE,
                merchant_id TEXT COLLATE "C" NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (card_ref, merchant_id)
            )""",
            "CREATE INDEX grants_merchant ON grants (merchant_id)",
            """CREATE TABLE audit_log (
                seq BIGINT PRIMARY KEY,
                at TIMESTAMPTZ NOT NULL,
                merchant_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                request_id TEXT NOT NULL,
                cc_jti TEXT NOT NULL,
                tt_jti TEXT NOT NULL,
                outcome TEXT NOT NULL,
                reason TEXT NOT NULL,
                prev_hash TEXT NOT NULL,
                hash TEXT NOT NULL
            )""",
            """CREATE TABLE audit_head (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                seq BIGINT NOT NULL,
                hash TEXT NOT NULL
            )""",
            f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, {_GENESIS})",  # noqa: S608 - constant
            """CREATE FUNCTION relay_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$""",
            """CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
               FOR EACH ROW EXECUTE FUNCTION relay_audit_append_only()""",
            """CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
               FOR EACH STATEMENT EXECUTE FUNCTION relay_audit_append_only()""",
            """CREATE FUNCTION relay_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF TG_OP <> 'UPDATE' OR NEW.seq <= OLD.seq THEN
                   RAISE EXCEPTION 'audit_head only moves forward';
                 END IF;
                 RETURN NEW;
               END $$""",
            """CREATE TRIGGER audit_head_forward BEFORE UPDATE OR DELETE ON audit_head
               FOR EACH ROW EXECUTE FUNCTION relay_audit_head_forward()""",
        ),
    ),
    (
        2,
        (
            """CREATE TABLE releases (
                cc_jti TEXT COLLATE "C" PRIMARY KEY,
                merchant_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                tt_jti TEXT NOT NULL,
                expires_at BIGINT NOT NULL,
                key_version INTEGER NOT NULL,
                sealed_token BYTEA NOT NULL
            )""",
            "CREATE INDEX releases_expiry ON releases (expires_at)",
        ),
    ),
    (
        3,
        (
            "ALTER TABLE audit_log ADD COLUMN actor TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE audit_log ADD COLUMN detail TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE audit_head ADD COLUMN mac TEXT NOT NULL DEFAULT ''",
        ),
    ),
    (
        4,
        (
            """CREATE TABLE cc_uses (
                cc_jti TEXT COLLATE "C" PRIMARY KEY,
                merchant_id TEXT NOT NULL,
                app_id TEXT NOT NULL,
                request_id TEXT NOT NULL,
                card_ref TEXT NOT NULL,
                expires_at BIGINT NOT NULL,
                holder TEXT NOT NULL,
                failed_reason TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX cc_uses_expiry ON cc_uses (expires_at)",
            """CREATE TABLE pci_instances (
                instance_id TEXT COLLATE "C" PRIMARY KEY,
                seen_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE rate_buckets (
                merchant_id TEXT COLLATE "C" PRIMARY KEY,
                tokens DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    (
        5,
        (
            """CREATE TABLE kek_checks (
                version INTEGER PRIMARY KEY,
                check_value TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL
            )""",
        ),
    ),
)
