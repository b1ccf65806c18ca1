"""The card vault: cards encrypted at rest, grants, and the hash-chained audit log.

Layout (STYLE section 1): `vault.py` the facade (`open_vault`, `CardVault`), `store.py` the
storage interface and row types with `sqlite.py` and `postgres.py` implementing it and
`migrations.py` their schemas, `envelope.py` the envelope encryption (the only module that
reveals card data), `kek.py` the KEK keyring, `audit.py` the hash chain, `errors.py` the
vault's errors. The id rules are `relay.ids`, shared with both sides.
"""

from __future__ import annotations

from pci_side.vault.audit import AuditEntry, AuditVerdict, StoredAuditEntry
from pci_side.vault.errors import (
    VaultIntegrityError,
    VaultKeyMissing,
    VaultStorageError,
    VaultUnavailable,
)
from pci_side.vault.kek import (
    FileKeyProvider,
    KeyProvider,
    Keyring,
    append_version,
    create_keyring,
)
from pci_side.vault.store import (
    CARD_REF_CONFLICT,
    CREATED,
    DUPLICATE_CARD,
    UNCHANGED,
    CardSummary,
    ContextUse,
)
from pci_side.vault.vault import (
    CardVault,
    CvvRetention,
    ImportOutcome,
    NewCard,
    Released,
    RotationReport,
    open_vault,
)

__all__ = [
    "CARD_REF_CONFLICT",
    "CREATED",
    "DUPLICATE_CARD",
    "UNCHANGED",
    "AuditEntry",
    "AuditVerdict",
    "CardSummary",
    "CardVault",
    "ContextUse",
    "CvvRetention",
    "FileKeyProvider",
    "ImportOutcome",
    "KeyProvider",
    "Keyring",
    "NewCard",
    "Released",
    "RotationReport",
    "StoredAuditEntry",
    "VaultIntegrityError",
    "VaultKeyMissing",
    "VaultStorageError",
    "VaultUnavailable",
    "append_version",
    "create_keyring",
    "open_vault",
]
