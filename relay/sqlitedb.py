"""What both SQLite stores share (the card vault, the gateway's ledger): URLs and transactions.

Both name their file with the same URL convention, `sqlite:///relative.db` or
`sqlite:////absolute/file.db` (four slashes), and write in explicit transactions, so that a
statement that fails halfway leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Final

from relay.errors import ConfigError

__all__ = ["URL_PREFIX", "Migrations", "migrate", "sqlite_path", "transaction", "use_wal"]

URL_PREFIX: Final = "sqlite:///"

Migrations = Sequence[tuple[int, Sequence[str]]]
"""(version, statements) in order: each version's statements run once, in one transaction."""


def sqlite_path(url: str, variable: str) -> str:
    """`sqlite:///relative.db` -> `relative.db`; `sqlite:////abs/file.db` -> `/abs/file.db`.

    variable names the setting in the error (never its value, which may be a secret's file).
    """
    path = url.removeprefix(URL_PREFIX)
    if not url.startswith(URL_PREFIX) or path in {"", ":memory:"}:
        raise ConfigError([f"{variable} must be sqlite:///PATH for a SQLite file"])
    return path


def use_wal(connection: sqlite3.Connection, *, busy_seconds: float = 5.0) -> None:
    """Put the file in WAL mode (once: the mode is kept in the file).

    Switching needs the file to itself, and SQLite answers "database is locked" at once, not
    after its busy timeout, when another connection is writing: processes opening a new file
    together retry here, on their own thread, until one of them has switched it.
    """
    deadline = time.monotonic() + busy_seconds
    while connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        try:
            connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """BEGIN (IMMEDIATE: take the write lock first), COMMIT, or ROLLBACK on any exception."""
    connection.execute(f"BEGIN {mode}")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def migrate(
    connection: sqlite3.Connection,
    migrations: Migrations,
    *,
    table: str,
    applied_at: str,
    newer: str,
) -> None:
    """Apply the versions not yet recorded in `table`; ConfigError(newer) if the file is newer.

    table is a constant of the caller's (never input): it is interpolated into the SQL.
    """
    with transaction(connection):
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {table} "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL) STRICT"
        )
        applied = {row[0] for row in connection.execute(f"SELECT version FROM {table}")}  # noqa: S608
        if applied - {version for version, _ in migrations}:
            raise ConfigError([newer])
        for version, statements in migrations:
            if version not in applied:
                for statement in statements:
                    connection.execute(statement)
                connection.execute(
                    f"INSERT INTO {table} (version, applied_at) VALUES (?, ?)",  # noqa: S608
                    (version, applied_at),
                )
