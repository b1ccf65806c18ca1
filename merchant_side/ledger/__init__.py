"""The token ledger: idempotency for RequestToken, keyed by the caller's request_id.

A repeated request_id gets the recorded result while its transient token lives, and is never
tokenized twice, including under concurrent duplicates and across gateway replicas. Two
backends behind one protocol (model.py): `memory` for one replica, and a PostgreSQL table that
replicas share.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from merchant_side.ledger.memory import MemoryLedger
from merchant_side.ledger.model import MAX_REQUEST_ID_LENGTH, Claim, Ledger, TokenRecord
from merchant_side.ledger.postgres import PostgresLedger
from relay.errors import ConfigError
from relay.secrets import Secret

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "Claim",
    "Ledger",
    "MemoryLedger",
    "PostgresLedger",
    "TokenRecord",
    "open_ledger",
]


async def open_ledger(
    url: Secret[str], *, clock: Callable[[], float] = time.time, pool_size: int = 10
) -> Ledger:
    """Open the ledger that url names: `memory`, or a postgresql:// DSN.

    The URL is a Secret because a DSN may carry a password. The clock (epoch seconds) is
    injectable so tests can move time; the PostgreSQL backend compares against it too.
    """
    value = url.get_secret_value()
    if value == "memory":
        return MemoryLedger(clock=clock)
    if value.startswith(("postgresql://", "postgres://")):
        return await PostgresLedger.open(value, clock=clock, pool_size=pool_size)
    raise ConfigError(["the ledger URL must be memory or a postgresql:// DSN"])
