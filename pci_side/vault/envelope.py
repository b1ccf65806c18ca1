"""Envelope encryption of vaulted cards: the only place where card data leaves its masked type.

Per card, a fresh 256-bit data-encryption key (DEK) seals the secret part, the PAN digits and
the optional security code, with AES-256-GCM. The DEK is wrapped with AES-256-GCM under a
versioned key-encryption key (KEK). Both use associated data (AAD) that binds them to their row:

- the record's AAD is the card_ref and every clear column that ends up in the CardData or in
  `relay cards list` (first 6, last 4, expiry, card type, has-CVV), so a ciphertext moved to
  another row, or an expiry edited in the database, fails to decrypt;
- the wrapped DEK's AAD is the card_ref and the KEK version, so a wrapped DEK moved to another
  row, or a key_version edited in a row, fails to unwrap.

Rotation re-wraps only the DEK (`rewrap_dek`): the record is never re-encrypted, and its AAD
does not contain the key version for exactly that reason. A failure names only the card_ref.

Sealed layouts: ciphertext = 0x01 | nonce (12) | GCM ciphertext and tag; wrapped DEK = 0x01 |
nonce (12) | GCM(DEK) and tag. The record plaintext is compact JSON {"cvv": ..., "pan": ...}.
The fingerprint (PCI DSS 4.0 req. 3.5.1.1) is hex HMAC-SHA256 of the PAN digits under a key
kept apart from the KEKs, so equal PANs dedupe without the vault holding a plain hash.

A KEK's check value is hex HMAC-SHA256 of a fixed label under the KEK: stored beside the rows,
it tells "this is not the key the vault was sealed with" apart from "this row was tampered
with", and reveals nothing of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pci_side.vault.errors import VaultIntegrityError
from pci_side.vault.store import CardRow, ReleaseRow, WrappedDek
from relay.cards import CardData, Pan, SecurityCode
from relay.errors import InvalidCardData
from relay.secrets import Secret

__all__ = [
    "check_unwraps",
    "fingerprint",
    "kek_check_value",
    "open_card",
    "open_token",
    "rewrap_dek",
    "seal_card",
    "seal_token",
    "without_security_code",
]

_FORMAT: Final = b"\x01"
_NONCE_BYTES: Final = 12
_DEK_BYTES: Final = 32
_RECORD_LABEL: Final = "relay.vault.card.v1"
_DEK_LABEL: Final = "relay.vault.dek.v1"
_RELEASE_LABEL: Final = "relay.vault.released-token.v1"
_CHECK_VALUE_LABEL: Final = b"relay kek check value v1"


def fingerprint(pan: Pan, key: Secret[bytes]) -> str:
    """Hex HMAC-SHA256 of the PAN digits: equal for equal PANs under one key, and only then."""
    digits = pan.reveal().encode("ascii")
    return hmac.new(key.get_secret_value(), digits, hashlib.sha256).hexdigest()


def kek_check_value(kek: Secret[bytes]) -> str:
    """Hex HMAC-SHA256 of a fixed label under the KEK: equal for one key, and only for it."""
    return hmac.new(kek.get_secret_value(), _CHECK_VALUE_LABEL, hashlib.sha256).hexdigest()


def seal_card(
    card_ref: str,
    card: CardData,
    *,
    key_version: int,
    kek: Secret[bytes],
    fingerprint_key: Secret[bytes],
) -> CardRow:
    """Encrypt a card under a fresh DEK wrapped by the KEK of key_version."""
    code = card.security_code
    secret = {"pan": card.pan.reveal(), "cvv": code.reveal() if code is not None else None}
    plaintext = json.dumps(secret, sort_keys=True, separators=(",", ":")).encode("ascii")
    dek = AESGCM.generate_key(bit_length=256)
    row = CardRow(
        card_ref=card_ref,
        first6=card.pan.bin,
        last4=card.pan.last4,
        exp_month=card.expiration_month,
        exp_year=card.expiration_year,
        card_type=card.card_type,
        has_security_code=code is not None,
        fingerprint=fingerprint(card.pan, fingerprint_key),
        key_version=key_version,
        wrapped_dek=b"",
        ciphertext=b"",
    )
    return _with_sealed(row, dek, plaintext, kek)


def _with_sealed(row: CardRow, dek: bytes, plaintext: bytes, kek: Secret[bytes]) -> CardRow:
    ciphertext = _seal(dek, plaintext, _record_aad(row))
    wrapped = _seal(kek.get_secret_value(), dek, _dek_aad(row.card_ref, row.key_version))
    return dataclasses.replace(row, wrapped_dek=wrapped, ciphertext=ciphertext)


def open_card(row: CardRow, kek: Secret[bytes]) -> CardData:
    """Unwrap the DEK and decrypt the card; VaultIntegrityError if anything does not check out."""
    dek = _unwrap(row.card_ref, row.key_version, row.wrapped_dek, kek)
    plaintext = _open(dek, row.ciphertext, _record_aad(row), _integrity_error(row.card_ref))
    try:
        secret = json.loads(plaintext)
        pan = Pan(secret["pan"])
        code = SecurityCode(secret["cvv"]) if secret["cvv"] is not None else None
        card = CardData(pan, row.exp_month, row.exp_year, code, row.card_type)
    except (ValueError, KeyError, TypeError, InvalidCardData):
        # Authentic but unreadable: never chain the cause, whose text could quote the record.
        raise _integrity_error(row.card_ref) from None
    return card


def without_security_code(row: CardRow, kek: Secret[bytes]) -> CardRow:
    """The row re-sealed with its security code deleted, under the same DEK.

    Keeping the DEK (and so wrapped_dek and key_version) lets this commute with a concurrent
    rotation, which re-wraps that DEK and never touches the record: whichever lands second,
    the row still opens. A fresh nonce seals the new record.
    """
    card = open_card(row, kek)
    dek = _unwrap(row.card_ref, row.key_version, row.wrapped_dek, kek)
    plaintext = json.dumps({"cvv": None, "pan": card.pan.reveal()}, separators=(",", ":"))
    stripped = dataclasses.replace(row, has_security_code=False)
    ciphertext = _seal(dek, plaintext.encode("ascii"), _record_aad(stripped))
    return dataclasses.replace(stripped, ciphertext=ciphertext)


def check_unwraps(row: WrappedDek, kek: Secret[bytes]) -> None:
    """Unwrap a DEK only to prove the KEK opens it; VaultIntegrityError if it does not."""
    _unwrap(row.card_ref, row.key_version, row.wrapped_dek, kek)


def rewrap_dek(
    row: WrappedDek, old_kek: Secret[bytes], new_kek: Secret[bytes], new_version: int
) -> bytes:
    """Unwrap a DEK under its old version and wrap it under the new one; the record is untouched."""
    dek = _unwrap(row.card_ref, row.key_version, row.wrapped_dek, old_kek)
    return _seal(new_kek.get_secret_value(), dek, _dek_aad(row.card_ref, new_version))


def seal_token(row: ReleaseRow, token: str, kek: Secret[bytes]) -> bytes:
    """A released transient token (a bearer credential) sealed under the KEK.

    The seal covers every other column of its row (context, merchant, request, card_ref, token
    jti, expiry, KEK version), so a row edited in the database no longer opens.
    """
    return _seal(kek.get_secret_value(), token.encode("ascii"), _release_aad(row))


def open_token(row: ReleaseRow, kek: Secret[bytes]) -> str:
    """The token seal_token sealed; VaultIntegrityError if the row was altered or moved."""
    broken = _release_error(row.cc_jti)
    opened = _open(kek.get_secret_value(), row.sealed_token, _release_aad(row), broken)
    return opened.decode("ascii")


def _release_aad(row: ReleaseRow) -> bytes:
    fields = [
        _RELEASE_LABEL,
        row.cc_jti,
        row.merchant_id,
        row.request_id,
        row.card_ref,
        row.tt_jti,
        row.expires_at,
        row.key_version,
    ]
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def _release_error(cc_jti: str) -> VaultIntegrityError:
    return VaultIntegrityError(
        "a kept release failed its integrity check: the row was moved, edited or corrupted",
        cc_jti=cc_jti,
    )


def _unwrap(card_ref: str, key_version: int, wrapped: bytes, kek: Secret[bytes]) -> bytes:
    aad = _dek_aad(card_ref, key_version)
    dek = _open(kek.get_secret_value(), wrapped, aad, _integrity_error(card_ref))
    if len(dek) != _DEK_BYTES:
        raise _integrity_error(card_ref)
    return dek


def _record_aad(row: CardRow) -> bytes:
    fields = [
        _RECORD_LABEL,
        row.card_ref,
        row.first6,
        row.last4,
        row.exp_month,
        row.exp_year,
        row.card_type,
        row.has_security_code,
    ]
    return json.dumps(fields, separators=(",", ":")).encode("utf-8")


def _dek_aad(card_ref: str, key_version: int) -> bytes:
    return json.dumps([_DEK_LABEL, card_ref, key_version], separators=(",", ":")).encode("utf-8")


def _seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return _FORMAT + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def _open(key: bytes, sealed: bytes, aad: bytes, broken: VaultIntegrityError) -> bytes:
    """Decrypt what _seal sealed, or raise `broken` (which names the row, never its content)."""
    if not sealed.startswith(_FORMAT) or len(sealed) < 1 + _NONCE_BYTES + 16:
        raise broken
    nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise broken from None


def _integrity_error(card_ref: str) -> VaultIntegrityError:
    return VaultIntegrityError(
        "stored card failed its integrity check: the row was moved, edited or corrupted",
        card_ref=card_ref,
    )
