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
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, Self

import structlog

from pci_side.vault.audit import (
    AuditEntry,
    AuditVerdict,
    ChainVerifier,
    StoredAuditEntry,
    check_entry,
)
from pci_side.vault.batching import GroupCommit
from pci_side.vault.envelope import (
    open_card,
    open_token,
    rewrap_dek,
    seal_card,
    seal_token,
    without_security_code,
)
from pci_side.vault.errors import VaultIntegrityError
from pci_side.vault.kek import KEK_FILE_VARIABLE, FileKeyProvider, KeyProvider, Keyring
from pci_side.vault.kek_checks import KeyChecks, verify_keyring
from pci_side.vault.postgres import PostgresStore
from pci_side.vault.sqlite import SQLiteStore
from pci_side.vault.store import (
    CardRow,
    CardSummary,
    CodeRemoval,
    ContextUse,
    ImportItem,
    ReleaseRow,
    Rewrap,
    Store,
    WrappedDek,
)
from relay.cards import CardData
from relay.config import CVV_DELETE_AFTER_USE, CVV_POLICIES, DEFAULT_CVV_MAX_AGE, VaultConfig
from relay.errors import CardNotFound, ConfigError, InvalidCardData, NotGranted, RateLimited
from relay.ids import check_card_ref, check_merchant_id
from relay.secrets import Secret

__all__ = [
    "CardVault",
    "Clock",
    "CvvRetention",
    "ImportOutcome",
    "NewCard",
    "Released",
    "RotationReport",
    "open_store",
    "open_vault",
]

Clock = Callable[[], dt.datetime]
_Append = tuple[dt.datetime, AuditEntry, ReleaseRow | None]
"""An audit entry, its time, and the release a success keeps in the same transaction."""

NOT_FOUND_MESSAGE: Final = "card not found"
KEPT_RELEASE_MARGIN_SECONDS: Final = 30
CONTEXT_USE_PURGE_EVERY: Final = 64
"""Claim transactions between two purges of expired context uses."""
CONTEXT_USE_GRACE_SECONDS: Final = 600
"""How long a context use is kept past the context's exp (clock skew between replicas)."""
MAX_PAGE: Final = 10_000
MAX_CVV_SWEEP_INTERVAL: Final = 300.0
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


@dataclasses.dataclass(frozen=True, slots=True)
class CvvRetention:
    """How long the vault keeps a security code (PCI DSS 4.0 3.3.1.2 and 3.3.3).

    `delete-after-use` deletes it once a tokenization succeeded; `keep` (for an issuer with a
    documented business need) does not. Under either, no CVV outlives max_age seconds after
    its card was stored: the worker's sweep deletes it.
    """

    policy: str = CVV_DELETE_AFTER_USE
    max_age: int = DEFAULT_CVV_MAX_AGE

    def __post_init__(self) -> None:
        """Refuse a policy or age the settings could not have produced."""
        if self.policy not in CVV_POLICIES or self.max_age < 1:
            raise ValueError("unknown CVV policy or a max age under 1 s")

    @classmethod
    def of(cls, config: VaultConfig) -> CvvRetention:
        """The retention RELAY_VAULT_CVV_POLICY and RELAY_VAULT_CVV_MAX_AGE ask for."""
        return cls(config.cvv_policy, config.cvv_max_age)

    @property
    def deletes_after_use(self) -> bool:
        """Whether a successful tokenization deletes the CVV."""
        return self.policy == CVV_DELETE_AFTER_USE

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: a CVV outlives max_age by at most a quarter of it (or 5 min)."""
        return min(self.max_age / 4, MAX_CVV_SWEEP_INTERVAL)

    def describe(self) -> str:
        """One line for operators, e.g. `delete-after-use, max age 86400 s`."""
        return f"{self.policy}, max age {self.max_age} s"


class CardVault:
    """Cards encrypted at rest, grants, and the audit chain, over one Store."""

    def __init__(  # noqa: PLR0913  the seams past the keys are keyword-only
        self,
        store: Store,
        keys: KeyProvider | Keyring,
        fingerprint_key: Secret[bytes],
        audit_key: Secret[bytes],
        *,
        clock: Clock = utc_now,
        cvv_retention: CvvRetention | None = None,
    ) -> None:
        """Use open_vault; this is the seam for tests and other key providers."""
        self._store = store
        self._keyring = keys if isinstance(keys, Keyring) else Keyring(keys)
        self._fingerprint_key = fingerprint_key
        self._audit_key = audit_key
        self._clock = clock
        self._cvv = cvv_retention if cvv_retention is not None else CvvRetention()
        self._claims: GroupCommit[ContextUse, ContextUse | None] = GroupCommit(
            self._claim_batch, name="vault-context-claims"
        )
        self._claim_batches = 0
        self._audit: GroupCommit[_Append, int] = GroupCommit(
            self._append_audit, name="vault-audit-append"
        )
        self._key_checks = KeyChecks(store, {}, clock)

    @property
    def cvv_retention(self) -> CvvRetention:
        """How long this vault keeps security codes."""
        return self._cvv

    @property
    def key_version(self) -> int:
        """The KEK version new cards are sealed under."""
        return self._keyring.provider.current_version()

    async def close(self) -> None:
        """Finish queued audit appends and claims, then close the store."""
        await self._audit.drain()
        await self._claims.drain()
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
        await self._key_checks.record(version, kek)
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
            await self._key_checks.explain(found.row.key_version, kek)
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
        await self._key_checks.record(version, kek)
        rewrapped, after = 0, None
        while batch := await self._store.deks_to_rewrap(version, after, batch_size):
            changes = [await self._rewrap(row, kek, version) for row in batch]
            rewrapped += await self._store.rewrap(changes, self._clock())
            after = batch[-1].card_ref
        _log.info("vault_key_rotated", rewrapped=rewrapped, current_version=version)
        return RotationReport(rewrapped, version)

    async def _rewrap(self, row: WrappedDek, kek: Secret[bytes], version: int) -> Rewrap:
        old_kek = await self._keyring.key(row.key_version)
        try:
            wrapped = rewrap_dek(row, old_kek, kek, version)
        except VaultIntegrityError:
            await self._key_checks.explain(row.key_version, old_kek)
            raise
        return Rewrap(row.card_ref, row.key_version, version, wrapped)

    async def security_code_used(self, card_ref: str) -> None:
        """Apply the CVV policy after a successful tokenization of card_ref.

        Never raises: the token is issued already, and failing the call would lose it. A CVV
        that could not be deleted is logged, and the sweep still bounds how long it stays.
        """
        if not self._cvv.deletes_after_use:
            return
        try:
            deleted = await self._delete_security_code(card_ref)
        except Exception as exc:  # noqa: BLE001  logged by type only: a message may quote values
            _log.error("vault_cvv_delete_failed", card_ref=card_ref, error=type(exc).__name__)
            return
        if deleted:
            _log.info("vault_cvv_deleted", deleted=1)

    async def _delete_security_code(self, card_ref: str) -> bool:
        """Re-seal card_ref without its CVV; False if it had none (or another writer removed it)."""
        # A lost compare-and-set means another writer changed the record: look again, once.
        for _ in range(2):
            row = await self._store.card_row(card_ref)
            if row is None or not row.has_security_code:
                return False
            removal = await self._code_removal(row)
            if await self._store.remove_security_codes([removal], self._clock()) == 1:
                return True
        return False

    async def _code_removal(self, row: CardRow) -> CodeRemoval:
        kek = await self._keyring.key(row.key_version)
        try:
            stripped = without_security_code(row, kek)
        except VaultIntegrityError:
            await self._key_checks.explain(row.key_version, kek)  # a wrong key is not tampering
            _log.error("vault_integrity_failure", card_ref=row.card_ref)
            raise
        return CodeRemoval(row.card_ref, row.ciphertext, stripped.ciphertext)

    async def purge_expired_security_codes(
        self, now: dt.datetime | None = None, *, batch_size: int = 200
    ) -> int:
        """Delete every CVV whose card was stored max_age or more before now; return how many.

        Batches go by card_ref; each removal is a compare-and-set on the record, so a
        concurrent deletion or rotation is never overwritten. A row that fails its integrity
        check is logged and skipped, so one bad row does not keep every other CVV.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        cutoff = (now or self._clock()) - dt.timedelta(seconds=self._cvv.max_age)
        purged, failed, after = 0, 0, None
        while batch := await self._store.rows_with_security_code(cutoff, after, batch_size):
            removals = []
            for row in batch:
                try:
                    removals.append(await self._code_removal(row))
                except VaultIntegrityError:
                    failed += 1
            if removals:
                purged += await self._store.remove_security_codes(removals, self._clock())
            after = batch[-1].card_ref
        _log.info("vault_cvv_purged", purged=purged, failed=failed, max_age=self._cvv.max_age)
        return purged

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
        try:
            token = open_token(row, kek)
        except VaultIntegrityError:
            await self._key_checks.explain(row.key_version, kek)
            raise
        return Released(
            cc_jti, merchant_id, request_id, card_ref, token, row.tt_jti, row.expires_at
        )

    async def claim_context(self, use: ContextUse) -> ContextUse | None:
        """Make use's context release a card for use's request only: None, or the use holding it.

        The first claim of a cc_jti wins on every replica; a caller given a holder must not
        release anything under that context. Claims arriving together share one transaction
        (group commit); expired uses are purged now and then.
        """
        return await self._claims.submit(use)

    async def _claim_batch(self, uses: Sequence[ContextUse]) -> list[ContextUse | None]:
        self._claim_batches += 1
        purge_before = None
        if self._claim_batches % CONTEXT_USE_PURGE_EVERY == 1:
            purge_before = int(self._clock().timestamp()) - CONTEXT_USE_GRACE_SECONDS
        return await self._store.claim_contexts(uses, purge_before)

    async def unclaim_context(self, use: ContextUse) -> None:
        """Give a context back: its card was never sent, so its request may try again."""
        await self._store.unclaim_context(use)

    async def fail_context(self, cc_jti: str, reason: str) -> None:
        """Note that the attempt under cc_jti failed after its card was sent, and why."""
        await self._store.fail_context(cc_jti, reason)

    async def take_over_context(self, held: ContextUse, holder: str) -> bool:
        """Hand a context whose holder died to holder; False if it changed meanwhile."""
        return await self._store.take_over_context(held, holder)

    async def beat(self, instance_id: str) -> None:
        """This PciRelay process is alive (see pci_side/presence.py)."""
        await self._store.beat(instance_id)

    async def leave(self, instance_id: str) -> None:
        """This PciRelay process stops, with nothing in flight."""
        await self._store.leave(instance_id)

    async def silent_for(self, instance_id: str) -> float | None:
        """Seconds since a PciRelay process's last heartbeat; None if it has none."""
        return await self._store.silent_for(instance_id)

    async def take_rate_token(self, merchant_id: str, rate: float, burst: int) -> None:
        """One call's worth of merchant_id's rate, shared by every replica; else RateLimited."""
        if not await self._store.take_rate_token(merchant_id, rate, burst):
            raise RateLimited("too many requests; slow down", merchant=merchant_id)

    async def record_attempt(self, entry: AuditEntry, released: Released | None = None) -> int:
        """Append one tokenization attempt to the audit chain; return its seq.

        A success carries what it released: kept, sealed, in the same transaction as its record,
        so that every success in the chain can be handed back to a repeat of its request.
        """
        row = None if released is None else await self._release_row(released)
        return await self._record(entry, row)

    async def record_refusal(
        self,
        reason: str,
        actor: str,
        *,
        merchant_id: str = "",
        request_id: str = "",
        card_ref: str = "",
    ) -> int:
        """Append a call refused before the tokenizer ran (reason: its relay reason code)."""
        entry = AuditEntry(
            merchant_id, card_ref, request_id, "", "", "refused", reason, actor=actor
        )
        return await self._record(entry)

    async def record_admin(
        self,
        action: str,
        actor: str,
        detail: str = "",
        *,
        merchant_id: str = "",
        card_ref: str = "",
    ) -> int:
        """Append an operator's action; detail holds counts and parameters, never card data."""
        entry = AuditEntry(merchant_id, card_ref, "", "", "", "admin", action, actor, detail)
        return await self._record(entry)

    async def _record(self, entry: AuditEntry, release: ReleaseRow | None = None) -> int:
        """Chain one entry (checked) through the group commit; its seq."""
        check_entry(entry)
        return await self._audit.submit((self._clock(), entry, release))

    async def _append_audit(self, batch: Sequence[_Append]) -> list[int]:
        """One transaction of the group commit: the entries chained, the releases kept."""
        entries = [(at, entry) for at, entry, _ in batch]
        releases = [release for _, _, release in batch if release is not None]
        stored = await self._store.append_audit(entries, releases, audit_key=self._audit_key)
        return [row.seq for row in stored]

    async def _release_row(self, released: Released) -> ReleaseRow:
        version, kek = self._keyring.current()
        await self._key_checks.record(version, kek)
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
        verifier, seq = ChainVerifier(self._audit_key), 0
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

    async def audit_pages(self, *, batch_size: int = 1000) -> AsyncIterator[list[StoredAuditEntry]]:
        """The chain in seq order, page by page (keyset on seq), up to the head read first.

        Stopping at that head keeps an export finite while appends go on (its own record too).
        """
        if not 1 <= batch_size <= MAX_PAGE:
            raise ValueError(f"batch_size must be 1 to {MAX_PAGE}")
        head_seq, *_ = await self._store.audit_head()
        seq = 0
        while seq < head_seq:
            rows = [
                row for row in await self._store.audit_after(seq, batch_size) if row.seq <= head_seq
            ]
            if not rows:
                return
            yield rows
            seq = rows[-1].seq

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

    The keyring is checked against the vault first (kek_checks.verify_keyring): a version in use
    that the keyring lacks, or holds another key for, is a ConfigError naming version and file.

    open_timeout bounds how long a PostgreSQL pool may take to fill before VaultUnavailable.
    """
    if len(config.fingerprint_key.get_secret_value()) < 32:
        raise ConfigError(["RELAY_VAULT_FINGERPRINT_KEY_FILE must hold at least 32 bytes"])
    if len(config.audit_key.get_secret_value()) < 32:
        raise ConfigError(["RELAY_VAULT_AUDIT_KEY_FILE must hold at least 32 bytes"])
    provider = keys or await FileKeyProvider.load(config.kek_file, group=config.secret_files_group)
    store = await open_store(config, open_timeout=open_timeout)
    try:
        source = f"{KEK_FILE_VARIABLE} ({config.kek_file})"
        await verify_keyring(store, provider, source, clock())
    except BaseException:
        await store.close()
        raise
    _log.info("vault_opened", backend=config.backend, key_version=provider.current_version())
    return CardVault(
        store,
        provider,
        config.fingerprint_key,
        config.audit_key,
        clock=clock,
        cvv_retention=CvvRetention.of(config),
    )
