"""The storage interface of the card vault, its row types, and the import decisions.

A `Store` runs single statements or short transactions and knows no cryptography: a `CardRow`
holds ciphertext and a wrapped DEK as opaque bytes, and `envelope.py` is what turns a card into
one and back. Two backends implement it (`sqlite.py`, `postgres.py`) and the facade
(`vault.py`) never writes SQL. What an import does with each card is decided once, here, by the
pure `plan_import`, which each backend calls inside its import transaction with what it found
in the database, so both backends decide alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

from pci_side.vault.audit import AuditEntry, AuditHead, StoredAuditEntry
from relay.secrets import Secret

# Column orders both backends read rows in: one list, so the two row decoders cannot drift.
CARD_COLUMNS: Final = (
    "card_ref, first6, last4, exp_month, exp_year, card_type, has_security_code, fingerprint, "
    "key_version, wrapped_dek, ciphertext"
)
AUDIT_COLUMNS: Final = (
    "seq, at, merchant_id, card_ref, request_id, cc_jti, tt_jti, outcome, reason, actor, detail, "
    "prev_hash, hash"
)

__all__ = [
    "CARD_REF_CONFLICT",
    "CREATED",
    "DUPLICATE_CARD",
    "RELEASE_COLUMNS",
    "UNCHANGED",
    "CardRow",
    "CardSummary",
    "CodeRemoval",
    "ContextUse",
    "FoundCard",
    "ImportItem",
    "ImportPlan",
    "ReleaseRow",
    "Rewrap",
    "Store",
    "WrappedDek",
    "plan_import",
    "versions_in_use",
]

CREATED: Final = "created"
UNCHANGED: Final = "unchanged"
CARD_REF_CONFLICT: Final = "card_ref_conflict"
DUPLICATE_CARD: Final = "duplicate_card"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class CardRow:
    """One row of the cards table, as written: clear metadata plus the sealed secret part."""

    card_ref: str
    first6: str
    last4: str
    exp_month: int
    exp_year: int
    card_type: str | None
    has_security_code: bool
    fingerprint: str
    key_version: int
    wrapped_dek: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        """Name the row; ciphertext, wrapped key and fingerprint are left out."""
        return f"CardRow({self.card_ref!r}, key_version={self.key_version})"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class FoundCard:
    """A card row looked up for a merchant, and whether that merchant is granted it."""

    row: CardRow
    granted: bool

    def __repr__(self) -> str:
        """Delegate to the row's short repr."""
        return f"FoundCard({self.row!r}, granted={self.granted})"


@dataclasses.dataclass(frozen=True, slots=True)
class CardSummary:
    """What `relay cards list` shows of a card: nothing that PCI DSS keeps out of clear text."""

    card_ref: str
    first6: str
    last4: str
    exp_month: int
    exp_year: int
    card_type: str | None
    has_security_code: bool
    key_version: int
    merchants: tuple[str, ...]
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class ImportItem:
    """A sealed card to import and the merchants to grant it to."""

    row: CardRow
    merchants: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class WrappedDek:
    """A card's wrapped DEK and the KEK version it is wrapped under, for rotation."""

    card_ref: str
    key_version: int
    wrapped_dek: bytes

    def __repr__(self) -> str:
        """Leave the wrapped key out."""
        return f"WrappedDek({self.card_ref!r}, key_version={self.key_version})"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Rewrap:
    """A compare-and-set: replace the wrapped DEK only if the row is still on old_version."""

    card_ref: str
    old_version: int
    new_version: int
    wrapped_dek: bytes

    def __repr__(self) -> str:
        """Leave the wrapped key out."""
        return f"Rewrap({self.card_ref!r}, {self.old_version}->{self.new_version})"


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class CodeRemoval:
    """A compare-and-set: replace the record only if it is still old_ciphertext.

    The new ciphertext holds the card without its security code, sealed under the same DEK,
    so the wrapped DEK and key version are left as they are (a rotation may be changing them).
    """

    card_ref: str
    old_ciphertext: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        """Leave the ciphertexts out."""
        return f"CodeRemoval({self.card_ref!r})"


RELEASE_COLUMNS: Final = (
    "cc_jti, merchant_id, request_id, card_ref, tt_jti, expires_at, key_version, sealed_token"
)


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class ReleaseRow:
    """The transient token one capture context released, sealed, and for which request."""

    cc_jti: str
    merchant_id: str
    request_id: str
    card_ref: str
    tt_jti: str
    expires_at: int
    """Epoch seconds: the token's exp; the row is useless (and purged) after it."""
    key_version: int
    sealed_token: bytes

    def __repr__(self) -> str:
        """Name the release; the sealed token is left out."""
        return f"ReleaseRow({self.cc_jti!r}, {self.request_id!r}, tt_jti={self.tt_jti!r})"


CONTEXT_USE_COLUMNS: Final = (
    "cc_jti, merchant_id, app_id, request_id, card_ref, expires_at, holder, failed_reason"
)


@dataclasses.dataclass(frozen=True, slots=True)
class ContextUse:
    """A capture context PciRelay accepted, and the one request it may release a card for."""

    cc_jti: str
    merchant_id: str
    app_id: str
    request_id: str
    card_ref: str
    expires_at: int
    """Epoch seconds: the context's exp; after it the context is refused anyway."""
    holder: str
    """The attempt holding the context: `<PciRelay instance id>/<attempt number>`."""
    failed_reason: str = ""
    """The reason its attempt failed after the card was sent ("" while none is known)."""

    def same_request(self, other: ContextUse) -> bool:
        """Whether other is this use's own request (a repeat), not another's."""
        return (self.merchant_id, self.app_id, self.request_id, self.card_ref) == (
            other.merchant_id,
            other.app_id,
            other.request_id,
            other.card_ref,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ImportPlan:
    """What one import transaction writes, and the status of each input card in order."""

    statuses: list[str]
    cards: list[CardRow]
    grants: list[tuple[str, str]]


def plan_import(
    items: Sequence[ImportItem],
    fingerprint_by_ref: Mapping[str, str],
    ref_by_fingerprint: Mapping[str, str],
) -> ImportPlan:
    """Decide each card against what the database holds and the cards before it in the batch.

    created: a new card_ref and a new card. unchanged: the card_ref already holds this card
    (equal fingerprint); only grants it lacks are written (the backends insert grants with
    ON CONFLICT DO NOTHING). card_ref_conflict: the card_ref holds another card.
    duplicate_card: this card is stored under another card_ref. A card and its grants are
    planned together, so they are written together by one transaction or not at all.
    """
    by_ref, by_fingerprint = dict(fingerprint_by_ref), dict(ref_by_fingerprint)
    plan = ImportPlan([], [], [])
    for item in items:
        row = item.row
        status = _status(row, by_ref, by_fingerprint)
        plan.statuses.append(status)
        if status == CREATED:
            plan.cards.append(row)
            by_ref[row.card_ref] = row.fingerprint
            by_fingerprint[row.fingerprint] = row.card_ref
        if status in {CREATED, UNCHANGED}:
            plan.grants.extend((row.card_ref, merchant) for merchant in item.merchants)
    plan.grants[:] = list(dict.fromkeys(plan.grants))
    return plan


def _status(row: CardRow, by_ref: Mapping[str, str], by_fingerprint: Mapping[str, str]) -> str:
    held = by_ref.get(row.card_ref)
    if held is not None:
        return UNCHANGED if held == row.fingerprint else CARD_REF_CONFLICT
    return DUPLICATE_CARD if row.fingerprint in by_fingerprint else CREATED


def versions_in_use(rows: Sequence[tuple[str, int]]) -> dict[int, str]:
    """(where, version) rows into version -> where, "cards" winning over "kept releases"."""
    found: dict[int, str] = {}
    for where, version in rows:
        if where == "cards" or version not in found:
            found[version] = where
    return found


class Store(Protocol):
    """What the vault needs from a database. Each method is one transaction."""

    async def close(self) -> None:
        """Release connections and threads."""
        ...

    async def import_cards(self, items: Sequence[ImportItem], now: dt.datetime) -> list[str]:
        """Apply plan_import to the items in one transaction; return the status of each."""
        ...

    async def find_card(self, card_ref: str, merchant_id: str) -> FoundCard | None:
        """The card row and whether merchant_id is granted it, or None if there is no card."""
        ...

    async def add_grant(self, card_ref: str, merchant_id: str, now: dt.datetime) -> bool | None:
        """True if added, False if it existed, None if there is no such card."""
        ...

    async def remove_grant(self, card_ref: str, merchant_id: str) -> bool:
        """True if a grant was removed."""
        ...

    async def list_cards(self, limit: int, after: str | None) -> list[CardSummary]:
        """Up to limit cards with card_ref > after, ordered by card_ref."""
        ...

    async def count_cards(self) -> int:
        """The number of cards."""
        ...

    async def deks_to_rewrap(
        self, current_version: int, after: str | None, limit: int
    ) -> list[WrappedDek]:
        """Up to limit rows with card_ref > after whose key_version is not current_version."""
        ...

    async def rewrap(self, changes: Sequence[Rewrap], now: dt.datetime) -> int:
        """Apply the compare-and-set changes in one transaction; return how many applied."""
        ...

    async def card_row(self, card_ref: str) -> CardRow | None:
        """The row of card_ref, or None."""
        ...

    async def rows_with_security_code(
        self, created_before: dt.datetime, after: str | None, limit: int
    ) -> list[CardRow]:
        """Up to limit rows holding a CVV, stored at or before created_before, card_ref > after."""
        ...

    async def remove_security_codes(self, changes: Sequence[CodeRemoval], now: dt.datetime) -> int:
        """Apply the compare-and-set changes in one transaction; return how many applied."""
        ...

    async def append_audit(
        self,
        entries: Sequence[tuple[dt.datetime, AuditEntry]],
        releases: Sequence[ReleaseRow] = (),
        *,
        audit_key: Secret[bytes],
    ) -> list[StoredAuditEntry]:
        """Chain the entries onto the head under audit_key, serialized against every other append.

        The releases are kept in the same transaction (the first for a cc_jti wins), and
        releases expired by the first entry's time are dropped.
        """
        ...

    async def audit_after(self, seq: int, limit: int) -> list[StoredAuditEntry]:
        """Up to limit entries with a seq above seq, ascending."""
        ...

    async def audit_newest(self, limit: int) -> list[StoredAuditEntry]:
        """The limit newest entries, newest first."""
        ...

    async def find_release(self, cc_jti: str) -> ReleaseRow | None:
        """The release kept for cc_jti, if any (expired or not: the caller checks)."""
        ...

    async def claim_contexts(
        self, uses: Sequence[ContextUse], purge_before: int | None
    ) -> list[ContextUse | None]:
        """Record each use unless its cc_jti is recorded already, in one transaction.

        For each use in order: None if it was recorded, else the use holding its jti (an
        earlier one of the batch, or one already there). Atomic across every process on the
        database (the primary key decides). Uses whose context expired before purge_before
        (epoch seconds) are deleted first, when given.
        """
        ...

    async def unclaim_context(self, use: ContextUse) -> None:
        """Delete use if its holder still holds it (its card was never sent)."""
        ...

    async def take_over_context(self, held: ContextUse, holder: str) -> bool:
        """Make holder the holder of held's context if held is still as read and unfailed."""
        ...

    async def beat(self, instance_id: str) -> None:
        """Note that the PciRelay process instance_id is alive, now."""
        ...

    async def leave(self, instance_id: str) -> None:
        """Forget instance_id's heartbeat: it stopped, with nothing in flight."""
        ...

    async def silent_for(self, instance_id: str) -> float | None:
        """Seconds since instance_id's last heartbeat; None if it has none."""
        ...

    async def fail_context(self, cc_jti: str, reason: str) -> None:
        """Note why the attempt under cc_jti failed after its card was sent."""
        ...

    async def take_rate_token(self, key: str, rate: float, burst: int) -> bool:
        """Take one token from key's bucket (burst, refilled at rate per second); False if empty.

        Shared by every process on the database where the backend can (PostgreSQL, on the
        database's clock); a SQLite vault serves one process and keeps its buckets in memory.
        """
        ...

    async def audit_head(self) -> AuditHead:
        """The (seq, hash) the head row records for the last entry ((0, GENESIS) when empty)."""
        ...

    async def kek_checks(self) -> dict[int, str]:
        """The check value recorded for each KEK version."""
        ...

    async def record_kek_check(self, version: int, check_value: str, now: dt.datetime) -> None:
        """Record a version's check value, unless one is recorded already (the first stays)."""
        ...

    async def key_versions_in_use(self, now: dt.datetime) -> dict[int, str]:
        """Each KEK version some card or unexpired kept release is sealed under, and which.

        The value is "cards" or "kept releases", for the message of a version the keyring lacks.
        """
        ...

    async def sealed_under(self, version: int) -> WrappedDek | ReleaseRow | None:
        """One card's wrapped DEK under version, else one kept release under it, else None."""
        ...
