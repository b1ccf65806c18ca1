"""What the token ledger stores and promises: TokenRecord, Claim and the Ledger protocol.

The ledger makes RequestToken idempotent. A request_id is *claimed* before any work: the first
caller gets a lease and tokenizes, later callers with the same request_id wait for its result
instead of tokenizing again, and the result is replayed while its transient token (TT) lives.
Both backends (memory.py, postgres.py) share these types and the rules written here, so the
gateway cannot tell them apart.

State of one request_id, on either backend::

    (absent) --claim--> pending (lease_until) --complete--> done (record, expires_at)
                           |   +--abandon / purge--> (absent)
                           +--lease lapses--> free: the next claim takes it over
    done --expires_at passes--> free: the next claim takes it over, purge deletes it
"""

from __future__ import annotations

import dataclasses
from typing import Final, Protocol

from relay.errors import InvalidRequest, Unavailable

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "Claim",
    "Ledger",
    "TokenRecord",
    "check_request_id",
    "held_elsewhere",
    "used_for_another_card",
]

MAX_REQUEST_ID_LENGTH: Final = 512
"""Generous for any caller's id, and small enough for a PostgreSQL index key and a NOTIFY
payload (8000 bytes) even at four bytes a character."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    """The recorded result of one RequestToken: what a repeated request_id gets back."""

    request_id: str
    card_ref: str
    transient_token: str = dataclasses.field(repr=False)
    """A bearer credential for 15 minutes: kept out of the repr, so out of logs and tracebacks."""
    jti: str
    expires_at: int
    """Epoch seconds: the TT's exp. The record is dropped with its token."""
    masked_pan: str
    """e.g. XXXXXXXXXXXX1111."""
    bin: str
    """The first six digits."""
    card_type: str
    """The Cybersource card-type code, e.g. "001"."""

    def live_at(self, now: float) -> bool:
        """Whether the token is still usable at now (epoch seconds)."""
        return now < self.expires_at


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """The answer to Ledger.claim.

    record set: the request was done already, return this record. record None: the caller now
    holds the lease and must call complete() or abandon().
    """

    record: TokenRecord | None


class Ledger(Protocol):
    """The merchant side's record of issued transient tokens, keyed by request_id."""

    async def claim(
        self, request_id: str, card_ref: str, *, lease_seconds: float, wait_seconds: float
    ) -> Claim:
        """Take request_id for card_ref, or return its live record, waiting for a live lease.

        Raises InvalidRequest when request_id is live for another card_ref, and Unavailable
        (retryable) when another caller still holds it after wait_seconds.
        """
        ...

    async def complete(self, record: TokenRecord) -> None:
        """Store the record and end the lease. A live record already stored is kept."""
        ...

    async def abandon(self, request_id: str) -> None:
        """End this ledger's lease on request_id without a record, so a retry may try again."""
        ...

    async def get(self, request_id: str) -> TokenRecord | None:
        """The record while its token lives, else None."""
        ...

    async def purge_expired(self) -> int:
        """Delete expired records and lapsed leases; return how many went."""
        ...

    async def close(self) -> None:
        """Release what the ledger holds (connections, waiters)."""
        ...


def check_request_id(request_id: str) -> None:
    """Refuse an empty or oversized request_id before it reaches storage."""
    if not 0 < len(request_id) <= MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest(f"request_id must be 1 to {MAX_REQUEST_ID_LENGTH} characters")


def used_for_another_card(request_id: str) -> InvalidRequest:
    """The error for a request_id that is live for another card_ref."""
    return InvalidRequest("request_id was already used for another card_ref", request_id=request_id)


def held_elsewhere(request_id: str) -> Unavailable:
    """The error for a request_id still held by another caller after the wait."""
    return Unavailable("request_id is being processed", request_id=request_id)
