"""The token ledger: idempotency for RequestToken, keyed by the caller's request_id.

A repeated request_id gets the recorded result while its transient token lives, and is never
tokenized twice, including under concurrent duplicates, restarts and across gateway replicas.
Three backends behind one protocol (model.py): a SQLite file for one replica (the default), a
PostgreSQL table that replicas share, and `memory`, which forgets everything on restart and is
for --insecure-dev only (relay/config.py refuses it otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from merchant_side.ledger.memory import MemoryLedger
from merchant_side.ledger.model import MAX_REQUEST_ID_LENGTH, Claim, Ledger, TokenRecord
from merchant_side.ledger.postgres import PostgresLedger
from merchant_side.ledger.sqlite import URL_PREFIX, SQLiteLedger, sqlite_path
from relay.errors import ConfigError
from relay.secrets import Secret

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "Claim",
    "Ledger",
    "MemoryLedger",
    "PostgresLedger",
    "SQLiteLedger",
    "TokenRecord",
    "open_ledger",
]


async def open_ledger(
    url: Secret[str], *, clock: Callable[[], float] = time.time, pool_size: int = 10
) -> Ledger:
    """Open the ledger that url names: `sqlite:///PATH`, a postgresql:// DSN, or `memory`.

    `sqlite:///relative.db` is relative to the working directory, `sqlite:////abs/ledger.db`
    absolute (the card vault's RELAY_VAULT_URL convention). The URL is a Secret because a DSN
    may carry a password. The clock (epoch seconds) is injectable so tests can move time; every
    backend compares leases and expiry against it.
    """
    value = url.get_secret_value()
    if value == "memory":
        return MemoryLedger(clock=clock)
    if value.startswith(URL_PREFIX):
        return await SQLiteLedger.open(sqlite_path(value), clock=clock)
    if value.startswith(("postgresql://", "postgres://")):
        return await PostgresLedger.open(value, clock=clock, pool_size=pool_size)
    raise ConfigError(["the ledger URL must be sqlite:///PATH, a postgresql:// DSN or memory"])
