"""What both SQLite stores share (the card vault, the gateway's ledger): URLs and transactions.

Both name their file with the same URL convention, `sqlite:///relative.db` or
`sqlite:////absolute/file.db` (four slashes), and write in explicit transactions, so that a
statement that fails halfway leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Final

from relay.errors import ConfigError

__all__ = ["URL_PREFIX", "sqlite_path", "transaction"]

URL_PREFIX: Final = "sqlite:///"


def sqlite_path(url: str, variable: str) -> str:
    """`sqlite:///relative.db` -> `relative.db`; `sqlite:////abs/file.db` -> `/abs/file.db`.

    variable names the setting in the error (never its value, which may be a secret's file).
    """
    path = url.removeprefix(URL_PREFIX)
    if not url.startswith(URL_PREFIX) or path in {"", ":memory:"}:
        raise ConfigError([f"{variable} must be sqlite:///PATH for a SQLite file"])
    return path


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
