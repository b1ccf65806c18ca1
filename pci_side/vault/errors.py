"""The card vault's own errors, under the relay's RelayError tree.

RelayError
 +- VaultIntegrityError  INTERNAL     VAULT_INTEGRITY      a record or wrapped DEK failed to decrypt
 +- VaultKeyMissing      INTERNAL     VAULT_KEY_MISSING    a row's KEK version is not in the keyring
 +- VaultKeyMismatch     INTERNAL     VAULT_KEY_MISMATCH   the keyring holds another key under a
                                                           row's version (an operator's error)
 +- VaultStorageError    INTERNAL     VAULT_STORAGE_ERROR  the database refused a statement
 +- VaultUnavailable     UNAVAILABLE  VAULT_UNAVAILABLE    the database is unreachable; retryable

Messages are fixed text plus ids (card_ref, key_version): never card data, never key material.
Database driver messages may quote column values, so a driver error is chained as the cause
(for operators) and never copied into the message (which may reach a gRPC status).
"""

from __future__ import annotations

import grpc

from relay.errors import RelayError

__all__ = [
    "VaultIntegrityError",
    "VaultKeyMismatch",
    "VaultKeyMissing",
    "VaultStorageError",
    "VaultUnavailable",
]


class VaultIntegrityError(RelayError):
    """A stored card failed authenticated decryption: its row was moved, edited or corrupted."""

    status = grpc.StatusCode.INTERNAL
    reason = "VAULT_INTEGRITY"


class VaultKeyMissing(RelayError):
    """A row is wrapped under a KEK version the keyring does not hold (check the KEK file)."""

    status = grpc.StatusCode.INTERNAL
    reason = "VAULT_KEY_MISSING"


class VaultKeyMismatch(RelayError):
    """The keyring holds another key under a row's KEK version: a key error, not tampering."""

    status = grpc.StatusCode.INTERNAL
    reason = "VAULT_KEY_MISMATCH"


class VaultStorageError(RelayError):
    """The vault database refused a statement; the transaction was rolled back."""

    status = grpc.StatusCode.INTERNAL
    reason = "VAULT_STORAGE_ERROR"


class VaultUnavailable(RelayError):
    """The vault database cannot be reached or timed out; the call may be retried."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "VAULT_UNAVAILABLE"
    retryable = True
