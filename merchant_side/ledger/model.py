"""What the token ledger stores and promises: TokenRecord, Claim and the Ledger protocol.

The ledger makes RequestToken idempotent. Requests are keyed by (app_id, request_id): each
merchant app (named by its client certificate) has its own request ids, so the same request_id
from two apps is two requests, and no operation of one app reaches another's entries. A
request_id is *claimed* before any work: the first
caller gets a lease and tokenizes, later callers with the same request_id wait for its result
instead of tokenizing again, and the result is replayed while its transient token (TT) lives.
Every backend (memory.py, sqlite.py, postgres.py) shares these types and the rules written
here, so the gateway cannot tell them apart.

Leases are short and renewed while the work runs, so a holder that died is replaced within
seconds. Before it sends a capture context (CC) to the PCI side, the holder notes that CC on its
lease; a caller that takes over the lapsed lease is handed that CC (Claim.previous_attempt) and
can ask the PCI side what became of that very attempt instead of tokenizing again.

State of one (app_id, request_id), on every backend::

    (absent) --claim--> pending: owner, lease_until, attempt
                           |  renew (owner): lease_until = now + lease_seconds
                           |  note_attempt (owner): attempt = the CC about to be sent
                           +--complete--> done: record, expires_at
                           +--abandon (owner) / purge--> (absent)
                           +--lease lapses--> free: the next claim takes it over under its own
                                 owner and clears attempt; that claim's previous_attempt is the
                                 attempt the lapsed holder noted
    done --expires_at passes--> free: the next claim takes it over (previous_attempt None),
                                 purge deletes it

The owner is the ledger object that claimed (one per process for memory and SQLite, one per
replica for PostgreSQL): renew, note_attempt and abandon act only on a pending entry this ledger
holds. A lapsed lease that nobody has taken over yet is still held: its owner may renew it or
note an attempt on it, and whoever takes it over later sees that attempt. Ownership is per
ledger, not per caller: if a caller's lease lapses and another caller of the same ledger takes
it over, the first one's renew and note_attempt still succeed. So a caller renews well within
its lease; a lapse is for a holder that died, not for one that was slow.
"""

from __future__ import annotations

import dataclasses
from typing import Final, Protocol

from relay.errors import InvalidRequest, Unavailable
from relay.ids import MAX_LENGTH, check_request_id

__all__ = [
    "MAX_REQUEST_ID_LENGTH",
    "NOTED_ATTEMPT_KEEP_SECONDS",
    "Claim",
    "Ledger",
    "TokenRecord",
    "check_request_id",
    "held_elsewhere",
    "is_free",
    "is_purgeable",
    "keeps_out",
    "kept_attempt",
    "used_for_another_card",
]

NOTED_ATTEMPT_KEEP_SECONDS: Final = 1800.0
"""A capture context's 15 minutes plus those of a token issued at its last moment: until then a
lapsed claim's noted attempt may have a live token that a retry must ask PciRelay about."""

MAX_REQUEST_ID_LENGTH: Final = MAX_LENGTH["request_id"]
"""relay.ids' limit: small enough for a PostgreSQL index key and a NOTIFY payload."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    """The recorded result of one RequestToken: what a repeated request_id gets back."""

    app_id: str
    """The merchant app that asked: only its own calls ever see this record."""
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
    receipt: str = dataclasses.field(default="", repr=False)
    """The PCI side's signed receipt for this release, passed on unverified ("" when none);
    long and no id, so out of the repr."""

    def live_at(self, now: float) -> bool:
        """Whether the token is still usable at now (epoch seconds)."""
        return now < self.expires_at


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """The answer to Ledger.claim.

    record set: the request was done already, return this record. record None: the caller now
    holds the lease, must keep it with renew() while it works, note_attempt() before it sends a
    capture context, and end it with complete() or abandon().
    """

    record: TokenRecord | None
    previous_attempt: str | None = dataclasses.field(default=None, repr=False)
    """When this claim took over a lapsed lease whose holder had noted an attempt: the capture
    context (compact JWT) that holder was about to send, so the new holder can ask the PCI side
    about that attempt before it starts another. None for a new request_id, for the takeover of
    an expired record, and for a lapsed lease that noted no attempt. Not a secret, but kept out
    of the repr with everything else that is not an id."""


class Ledger(Protocol):
    """The merchant side's record of issued transient tokens, keyed by (app_id, request_id)."""

    async def claim(
        self,
        app_id: str,
        request_id: str,
        card_ref: str,
        *,
        lease_seconds: float,
        wait_seconds: float,
    ) -> Claim:
        """Take app_id's request_id for card_ref, or return its live record, waiting for a lease.

        Raises InvalidRequest when request_id is live for another card_ref, and Unavailable
        (retryable) when another caller still holds it after wait_seconds.
        """
        ...

    async def complete(self, record: TokenRecord) -> None:
        """Store the record and end the lease, also one this ledger lost to a takeover.

        A token that was issued is worth recording whoever holds the lease now. A live record
        already stored is kept (it is what duplicates were given), and so is a live lease for
        another card_ref.
        """
        ...

    async def abandon(self, app_id: str, request_id: str) -> None:
        """End this ledger's lease on request_id without a record, so a retry may try again."""
        ...

    async def renew(self, app_id: str, request_id: str, lease_seconds: float) -> bool:
        """Extend this ledger's lease on request_id to now + lease_seconds.

        False when this ledger no longer holds it (taken over, completed, abandoned or purged):
        the caller has lost the request and must stop working on it. A lease that lapsed but
        that nobody took over yet is still this ledger's, and renews.
        """
        ...

    async def note_attempt(self, app_id: str, request_id: str, capture_context: str) -> bool:
        """Record on this ledger's lease the capture context about to be sent to the PCI side.

        It replaces any attempt noted before. False, recording nothing, when this ledger no
        longer holds the lease (as for renew): the caller must then not send it. Noted before
        the send, it is what a caller that takes over the lease gets as Claim.previous_attempt.
        """
        ...

    async def get(self, app_id: str, request_id: str) -> TokenRecord | None:
        """app_id's record for request_id while its token lives, else None."""
        ...

    async def purge_expired(self) -> int:
        """Delete expired records and lapsed leases; return how many went."""
        ...

    async def close(self) -> None:
        """Release what the ledger holds (connections, waiters)."""
        ...


def is_free(record: TokenRecord | None, lease_until: float, now: float) -> bool:
    """Whether an entry may be claimed: a lapsed lease, or an expired token."""
    if record is None:
        return lease_until <= now
    return not record.live_at(now)


def is_purgeable(
    record: TokenRecord | None, lease_until: float, attempt: str | None, now: float
) -> bool:
    """Whether purge may delete an entry: any free one but a lapsed claim with a noted attempt.

    That one is kept NOTED_ATTEMPT_KEEP_SECONDS past its lease, for a retry to ask about.
    """
    if record is None and attempt is not None:
        return lease_until + NOTED_ATTEMPT_KEEP_SECONDS <= now
    return is_free(record, lease_until, now)


def kept_attempt(
    record: TokenRecord | None, held_for: str, attempt: str | None, card_ref: str
) -> str | None:
    """The noted attempt a takeover for card_ref inherits: a pending claim's, for the same card."""
    return attempt if record is None and held_for == card_ref else None


def keeps_out(
    record: TokenRecord | None, lease_until: float, held_for: str, card_ref: str, now: float
) -> bool:
    """Whether a record for card_ref may not replace an entry held for the card held_for."""
    live = not is_free(record, lease_until, now)
    return live and (record is not None or held_for != card_ref)


def used_for_another_card(request_id: str) -> InvalidRequest:
    """The error for a request_id that is live for another card_ref."""
    return InvalidRequest("request_id was already used for another card_ref", request_id=request_id)


def held_elsewhere(request_id: str) -> Unavailable:
    """The error for a request_id still held by another caller after the wait."""
    return Unavailable("request_id is being processed", request_id=request_id)
