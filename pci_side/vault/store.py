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

from pci_side.vault.audit import AuditEntry, StoredAuditEntry

# Column orders both backends read rows in: one list, so the two row decoders cannot drift.
CARD_COLUMNS: Final = (
    "card_ref, first6, last4, exp_month, exp_year, card_type, has_security_code, fingerprint, "
    "key_version, wrapped_dek, ciphertext"
)
AUDIT_COLUMNS: Final = (
    "seq, at, merchant_id, card_ref, request_id, cc_jti, tt_jti, outcome, reason, prev_hash, hash"
)

__all__ = [
    "CARD_REF_CONFLICT",
    "CREATED",
    "DUPLICATE_CARD",
    "RELEASE_COLUMNS",
    "UNCHANGED",
    "CardRow",
    "CardSummary",
    "FoundCard",
    "ImportItem",
    "ImportPlan",
    "ReleaseRow",
    "Rewrap",
    "Store",
    "WrappedDek",
    "plan_import",
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

    async def append_audit(
        self,
        entries: Sequence[tuple[dt.datetime, AuditEntry]],
        releases: Sequence[ReleaseRow] = (),
    ) -> list[StoredAuditEntry]:
        """Chain the entries onto the head, serialized against every other append.

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

    async def audit_head(self) -> tuple[int, str]:
        """The (seq, hash) the head row records for the last entry ((0, GENESIS) when empty)."""
        ...
