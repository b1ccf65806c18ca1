"""The card vault: the one object the worker and the CLI use, over a Store and a keyring.

`open_vault(config)` loads the KEK keyring, opens the backend named by the URL (applying
migrations) and returns a `CardVault`. The facade sequences the steps (seal, store, look up,
unseal, audit) and writes no SQL; `envelope.py` does the cryptography and `store.py` the rows.

A card that does not exist and a card that is not granted to the caller raise CardNotFound and
NotGranted with the same message, status and reason, so the caller learns nothing about cards
it may not use; only the audit record (written by the worker) says which it was.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from typing import Final, Self

import structlog

from pci_side.vault.audit import (
    AuditBatcher,
    AuditEntry,
    AuditVerdict,
    ChainVerifier,
    StoredAuditEntry,
    check_entry,
)
from pci_side.vault.envelope import open_card, open_token, rewrap_dek, seal_card, seal_token
from pci_side.vault.errors import VaultIntegrityError
from pci_side.vault.kek import FileKeyProvider, KeyProvider, Keyring
from pci_side.vault.postgres import PostgresStore
from pci_side.vault.sqlite import SQLiteStore
from pci_side.vault.store import CardSummary, ImportItem, ReleaseRow, Rewrap, Store
from relay.cards import CardData
from relay.config import VaultConfig
from relay.errors import CardNotFound, ConfigError, InvalidCardData, NotGranted
from relay.ids import check_card_ref, check_merchant_id
from relay.secrets import Secret

__all__ = [
    "CardVault",
    "Clock",
    "ImportOutcome",
    "NewCard",
    "Released",
    "RotationReport",
    "open_store",
    "open_vault",
]

Clock = Callable[[], dt.datetime]

NOT_FOUND_MESSAGE: Final = "card not found"
KEPT_RELEASE_MARGIN_SECONDS: Final = 30
MAX_PAGE: Final = 10_000
_log = structlog.get_logger("pci_side.vault")


def utc_now() -> dt.datetime:
    """The production clock."""
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class NewCard:
    """A card to import under card_ref, granted to merchants (sorted and deduplicated)."""

    card_ref: str
    card: CardData
    merchants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the ids (InvalidRequest names the kind, never the value) and the card."""
        check_card_ref(self.card_ref)
        if not isinstance(self.card, CardData):
            raise InvalidCardData("card must be a CardData", card_ref=self.card_ref)
        for merchant_id in self.merchants:
            check_merchant_id(merchant_id)
        object.__setattr__(self, "merchants", tuple(sorted(set(self.merchants))))


@dataclasses.dataclass(frozen=True, slots=True)
class Released:
    """A transient token a capture context released, for one merchant's request."""

    cc_jti: str
    merchant_id: str
    request_id: str
    card_ref: str
    token: str = dataclasses.field(repr=False)
    """A bearer credential until it expires: kept out of the repr, sealed at rest."""
    tt_jti: str
    expires_at: int


@dataclasses.dataclass(frozen=True, slots=True)
class ImportOutcome:
    """What import_cards did with one card."""

    card_ref: str
    status: str
    """"created", "unchanged", "card_ref_conflict" or "duplicate_card"."""


@dataclasses.dataclass(frozen=True, slots=True)
class RotationReport:
    """How many DEKs a rotation re-wrapped, and the KEK version they are now under."""

    rewrapped: int
    current_version: int


class CardVault:
    """Cards encrypted at rest, grants, and the audit chain, over one Store."""

    def __init__(
        self,
        store: Store,
        keys: KeyProvider | Keyring,
        fingerprint_key: Secret[bytes],
        *,
        clock: Clock = utc_now,
    ) -> None:
        """Use open_vault; this is the seam for tests and other key providers."""
        self._store = store
        self._keyring = keys if isinstance(keys, Keyring) else Keyring(keys)
        self._fingerprint_key = fingerprint_key
        self._clock = clock
        self._audit: AuditBatcher[ReleaseRow] = AuditBatcher(store.append_audit)

    @property
    def key_version(self) -> int:
        """The KEK version new cards are sealed under."""
        return self._keyring.provider.current_version()

    async def close(self) -> None:
        """Finish queued audit appends, then close the store."""
        await self._audit.drain()
        await self._store.close()

    async def __aenter__(self) -> Self:
        """Use as `async with await open_vault(config) as vault:`."""
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the vault."""
        await self.close()

    async def import_cards(self, cards: Sequence[NewCard]) -> list[ImportOutcome]:
        """Import a batch in one transaction; see store.plan_import for the statuses."""
        if not cards:
            return []
        version, kek = self._keyring.current()
        items = [
            ImportItem(
                seal_card(
                    new.card_ref,
                    new.card,
                    key_version=version,
                    kek=kek,
                    fingerprint_key=self._fingerprint_key,
                ),
                new.merchants,
            )
            for new in cards
        ]
        statuses = await self._store.import_cards(items, self._clock())
        _log.debug("vault_cards_imported", **collections.Counter(statuses))
        return [ImportOutcome(new.card_ref, s) for new, s in zip(cards, statuses, strict=True)]

    async def load_card(self, card_ref: str, merchant_id: str) -> CardData:
        """Decrypt a card for a merchant it is granted to; else CardNotFound or NotGranted."""
        found = await self._store.find_card(card_ref, merchant_id)
        if found is None:
            raise CardNotFound(NOT_FOUND_MESSAGE, card_ref=card_ref)
        if not found.granted:
            raise NotGranted(NOT_FOUND_MESSAGE, card_ref=card_ref)
        kek = await self._keyring.key(found.row.key_version)
        try:
            return open_card(found.row, kek)
        except VaultIntegrityError:
            _log.error("vault_integrity_failure", card_ref=card_ref)
            raise

    async def grant(self, card_ref: str, merchant_id: str) -> bool:
        """Allow merchant_id to tokenize card_ref; False if it already could."""
        check_merchant_id(merchant_id)
        added = await self._store.add_grant(card_ref, merchant_id, self._clock())
        if added is None:
            raise CardNotFound(NOT_FOUND_MESSAGE, card_ref=card_ref)
        return added

    async def revoke(self, card_ref: str, merchant_id: str) -> bool:
        """Withdraw a grant; False if there was none; CardNotFound if there is no such card."""
        if await self._store.remove_grant(card_ref, merchant_id):
            return True
        if await self._store.find_card(card_ref, merchant_id) is None:
            raise CardNotFound(NOT_FOUND_MESSAGE, card_ref=card_ref)
        return False

    async def list_cards(self, *, limit: int = 100, after: str | None = None) -> list[CardSummary]:
        """Masked summaries ordered by card_ref, after the given card_ref (keyset paging)."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE}")
        return await self._store.list_cards(limit, after)

    async def count_cards(self) -> int:
        """The number of cards in the vault."""
        return await self._store.count_cards()

    async def rotate_key(self, *, batch_size: int = 200) -> RotationReport:
        """Re-wrap every DEK not under the keyring's current version, batch by batch.

        The keyring is re-read first, so the newest version in the file is used. Each row is
        updated with a compare-and-set on its old version, so readers (which decrypt under
        either version as long as the keyring holds both) and a second rotation can run at the
        same time. Records themselves are never re-encrypted.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        await self._keyring.reload()
        version, kek = self._keyring.current()
        rewrapped, after = 0, None
        while batch := await self._store.deks_to_rewrap(version, after, batch_size):
            changes = [
                Rewrap(
                    row.card_ref,
                    row.key_version,
                    version,
                    rewrap_dek(row, await self._keyring.key(row.key_version), kek, version),
                )
                for row in batch
            ]
            rewrapped += await self._store.rewrap(changes, self._clock())
            after = batch[-1].card_ref
        _log.info("vault_key_rotated", rewrapped=rewrapped, current_version=version)
        return RotationReport(rewrapped, version)

    async def kept_release(
        self, cc_jti: str, merchant_id: str, request_id: str, card_ref: str
    ) -> Released | None:
        """What cc_jti released for this very request, while its token lives; else None."""
        row = await self._store.find_release(cc_jti)
        if row is None or (row.merchant_id, row.request_id, row.card_ref) != (
            merchant_id,
            request_id,
            card_ref,
        ):
            return None
        # A token about to expire is of no use to hand back: a fresh tokenization is.
        if row.expires_at - KEPT_RELEASE_MARGIN_SECONDS <= self._clock().timestamp():
            return None
        kek = await self._keyring.key(row.key_version)
        token = open_token(row, kek)
        return Released(
            cc_jti, merchant_id, request_id, card_ref, token, row.tt_jti, row.expires_at
        )

    async def record_attempt(self, entry: AuditEntry, released: Released | None = None) -> int:
        """Append one tokenization attempt to the audit chain; return its seq.

        A success carries what it released: kept, sealed, in the same transaction as its record,
        so that every success in the chain can be handed back to a repeat of its request.
        """
        check_entry(entry)
        row = None if released is None else self._release_row(released)
        return await self._audit.append(self._clock(), entry, row)

    def _release_row(self, released: Released) -> ReleaseRow:
        version, kek = self._keyring.current()
        row = ReleaseRow(
            released.cc_jti,
            released.merchant_id,
            released.request_id,
            released.card_ref,
            released.tt_jti,
            released.expires_at,
            version,
            b"",
        )
        return dataclasses.replace(row, sealed_token=seal_token(row, released.token, kek))

    async def verify_audit(self, *, batch_size: int = 1000) -> AuditVerdict:
        """Walk the chain up to the head read at the start, and report the first broken link."""
        head = await self._store.audit_head()
        verifier, seq = ChainVerifier(), 0
        while seq < head[0]:
            rows = await self._store.audit_after(seq, batch_size)
            rows = [row for row in rows if row.seq <= head[0]]
            if not rows or not all(verifier.feed(row) for row in rows):
                break
            seq = rows[-1].seq
        verdict = verifier.finish(head)
        if not verdict.ok:
            _log.error("vault_audit_broken", first_broken=verdict.first_broken)
        return verdict

    async def unfinished_attempts(self, *, batch_size: int = 1000) -> list[StoredAuditEntry]:
        """The `started` records with no outcome after them: attempts a crash cut short.

        Their card may have reached Flex; no token was handed back for them.
        """
        # An outcome closes the latest open attempt of its request under its context; a repeat
        # after a crash is a new attempt, so the crashed one stays open.
        open_attempts: dict[tuple[str, str, str], list[StoredAuditEntry]] = {}
        seq = 0
        while rows := await self._store.audit_after(seq, batch_size):
            for row in rows:
                entry = row.entry
                key = (entry.merchant_id, entry.request_id, entry.cc_jti)
                if entry.outcome == "started":
                    open_attempts.setdefault(key, []).append(row)
                elif entry.outcome in {"success", "failure"} and open_attempts.get(key):
                    open_attempts[key].pop()
            seq = rows[-1].seq
        return sorted(
            (row for rows in open_attempts.values() for row in rows), key=lambda row: row.seq
        )

    async def audit_entries(self, *, limit: int = 100) -> list[StoredAuditEntry]:
        """The newest entries, newest first."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1 to {MAX_PAGE}")
        return await self._store.audit_newest(limit)


async def open_store(config: VaultConfig, *, open_timeout: float = 30.0) -> Store:
    """Open the backend named by the URL's scheme, applying migrations."""
    url = config.url.get_secret_value()
    if config.backend == "sqlite":
        return await SQLiteStore.open(url)
    if config.backend in {"postgresql", "postgres"}:
        return await PostgresStore.open(url, config.pool_size, open_timeout=open_timeout)
    raise ConfigError(["RELAY_VAULT_URL must start with sqlite:/// or postgresql://"])


async def open_vault(
    config: VaultConfig,
    *,
    keys: KeyProvider | None = None,
    clock: Clock = utc_now,
    open_timeout: float = 30.0,
) -> CardVault:
    """Load the keyring (RELAY_VAULT_KEK_FILE unless keys is given), open the store, and wrap.

    open_timeout bounds how long a PostgreSQL pool may take to fill before VaultUnavailable.
    """
    if len(config.fingerprint_key.get_secret_value()) < 32:
        raise ConfigError(["RELAY_VAULT_FINGERPRINT_KEY_FILE must hold at least 32 bytes"])
    provider = keys if keys is not None else await FileKeyProvider.load(config.kek_file)
    store = await open_store(config, open_timeout=open_timeout)
    _log.info("vault_opened", backend=config.backend, key_version=provider.current_version())
    return CardVault(store, provider, config.fingerprint_key, clock=clock)
