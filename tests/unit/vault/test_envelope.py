"""Envelope encryption: rows are bound to their card_ref, clear columns and key version.

Tampering is done as an attacker with database access would do it, with raw SQL on the vault's
own database, on both backends.
"""

from __future__ import annotations

import dataclasses
import secrets

import pytest

from pci_side.vault import (
    CardVault,
    NewCard,
    VaultIntegrityError,
    VaultKeyMissing,
    append_version,
    envelope,
    open_vault,
)
from pci_side.vault.envelope import fingerprint, open_card, rewrap_dek, seal_card
from pci_side.vault.store import WrappedDek
from relay.cards import CardData, Pan, SecurityCode
from relay.config import VaultConfig
from relay.secrets import Secret
from tests.cards_testdata import TEST_PANS, find_test_pans
from tests.vault_backends import run_sql

KEK = Secret(secrets.token_bytes(32))
OTHER_KEK = Secret(secrets.token_bytes(32))
FINGERPRINT_KEY = Secret(secrets.token_bytes(32))
MESSAGE = "stored card failed its integrity check: the row was moved, edited or corrupted"


def card(index: int, code: str | None = "123") -> CardData:
    return CardData(Pan(TEST_PANS[index]), 3, 2032, SecurityCode(code) if code else None)


async def import_two(vault: CardVault) -> None:
    await vault.import_cards([NewCard("a", card(0), ("m",)), NewCard("b", card(3), ("m",))])


async def assert_integrity_error(vault: CardVault, card_ref: str) -> None:
    with pytest.raises(VaultIntegrityError) as info:
        await vault.load_card(card_ref, "m")
    assert (MESSAGE, {"card_ref": card_ref}, "VAULT_INTEGRITY") == (
        str(info.value),
        info.value.ids,
        info.value.reason,
    )


@pytest.mark.parametrize(
    "columns",
    [("ciphertext",), ("wrapped_dek",), ("ciphertext", "wrapped_dek")],
    ids="+".join,
)
async def test_sealed_columns_moved_to_another_row_fail(
    vault: CardVault, vault_config: VaultConfig, columns: tuple[str, ...]
) -> None:
    """A ciphertext or wrapped DEK copied from row b into row a fails to decrypt as a."""
    await import_two(vault)
    for column in columns:
        run_sql(
            vault_config,
            f"UPDATE cards SET {column} = (SELECT {column} FROM cards WHERE card_ref = 'b') "  # noqa: S608
            "WHERE card_ref = 'a'",
        )
    await assert_integrity_error(vault, "a")
    assert TEST_PANS[3][-4:] == (await vault.load_card("b", "m")).pan.last4


@pytest.mark.parametrize(
    ("column", "value"),
    [("exp_year", 2033), ("exp_month", 4), ("last4", "0000"), ("card_type", "002")],
)
async def test_edited_clear_columns_fail(
    vault: CardVault, vault_config: VaultConfig, column: str, value: object
) -> None:
    """Editing a clear column that the card is rebuilt from breaks the record's AAD."""
    await import_two(vault)
    run_sql(vault_config, f"UPDATE cards SET {column} = ? WHERE card_ref = 'a'", [value])  # noqa: S608
    await assert_integrity_error(vault, "a")


async def test_edited_key_version_fails(vault_config: VaultConfig) -> None:
    """A key_version edited to another version in the keyring fails to unwrap the DEK."""
    append_version(vault_config.kek_file)
    async with await open_vault(vault_config) as vault:
        await import_two(vault)
        run_sql(vault_config, "UPDATE cards SET key_version = 1 WHERE card_ref = 'a'")
        await assert_integrity_error(vault, "a")


async def test_key_version_not_in_the_keyring_is_key_missing(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """A key_version the keyring does not hold, even after a reload, raises VaultKeyMissing."""
    await import_two(vault)
    run_sql(vault_config, "UPDATE cards SET key_version = 77 WHERE card_ref = 'a'")
    with pytest.raises(VaultKeyMissing) as info:
        await vault.load_card("a", "m")
    assert {"key_version": "77"} == info.value.ids


async def test_no_column_holds_the_pan_or_code_in_clear(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """The stored row, every column rendered as text and hex, holds no PAN and no CVV."""
    await vault.import_cards([NewCard("a", card(0, "4321"))])
    [row] = run_sql(vault_config, "SELECT * FROM cards")
    rendered = repr(row) + " ".join(v.hex() for v in row if isinstance(v, bytes))
    raw = b"".join(v for v in row if isinstance(v, bytes))
    assert ([], False, False) == (
        find_test_pans(rendered),
        TEST_PANS[0].encode() in raw,
        b"4321" in raw,
    )


def test_wrong_kek_fails_to_open() -> None:
    """A row opened under another KEK raises VaultIntegrityError."""
    row = seal_card("a", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
    with pytest.raises(VaultIntegrityError):
        open_card(row, OTHER_KEK)


def test_record_is_bound_to_its_card_ref_even_under_its_own_dek() -> None:
    """A record moved along with its DEK, re-wrapped for the new card_ref by a KEK holder, fails."""
    sealed = seal_card("b", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
    dek = envelope._unwrap("b", 1, sealed.wrapped_dek, KEK)
    forged_wrap = envelope._seal(KEK.get_secret_value(), dek, envelope._dek_aad("a", 1))
    moved = dataclasses.replace(sealed, card_ref="a", wrapped_dek=forged_wrap)
    with pytest.raises(VaultIntegrityError):
        open_card(moved, KEK)


def test_truncated_ciphertext_fails_to_open() -> None:
    """A cut-short ciphertext raises VaultIntegrityError, not an IndexError or a crypto error."""
    row = seal_card("a", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
    for cut in (0, 5, 20):
        with pytest.raises(VaultIntegrityError):
            open_card(dataclasses.replace(row, ciphertext=row.ciphertext[:cut]), KEK)


def test_rewrap_keeps_the_record_and_binds_the_new_version() -> None:
    """A re-wrapped DEK opens the unchanged record under the new KEK and version only."""
    row = seal_card("a", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
    wrapped = rewrap_dek(WrappedDek("a", 1, row.wrapped_dek), KEK, OTHER_KEK, 2)
    moved = dataclasses.replace(row, key_version=2, wrapped_dek=wrapped)
    assert card(0).pan == open_card(moved, OTHER_KEK).pan
    with pytest.raises(VaultIntegrityError):
        open_card(dataclasses.replace(moved, key_version=3), OTHER_KEK)


def test_each_seal_uses_a_fresh_dek_and_nonce() -> None:
    """Sealing the same card twice gives different ciphertexts and wrapped DEKs."""
    first, second = (
        seal_card("a", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
        for _ in range(2)
    )
    assert (False, False) == (
        first.ciphertext == second.ciphertext,
        first.wrapped_dek == second.wrapped_dek,
    )


def test_sealed_row_repr_leaves_secrets_out() -> None:
    """A CardRow renders as its card_ref and key version only."""
    row = seal_card("a", card(0), key_version=1, kek=KEK, fingerprint_key=FINGERPRINT_KEY)
    assert "CardRow('a', key_version=1)" == repr(row)


def test_fingerprint_is_equal_for_equal_pans_only() -> None:
    """Same PAN and key: equal. Another PAN or another key: different. Always 64 hex digits."""
    same = fingerprint(Pan(TEST_PANS[0]), FINGERPRINT_KEY)
    again = fingerprint(Pan(TEST_PANS[0]), FINGERPRINT_KEY)
    other_pan = fingerprint(Pan(TEST_PANS[1]), FINGERPRINT_KEY)
    other_key = fingerprint(Pan(TEST_PANS[0]), Secret(secrets.token_bytes(32)))
    assert (True, False, False, 64) == (
        same == again,
        same == other_pan,
        same == other_key,
        len(bytes.fromhex(same)) * 2,
    )


def test_fingerprint_is_hmac_sha256_of_the_digits() -> None:
    """The fingerprint is the documented construction, so another tool can compute it."""
    import hashlib  # noqa: PLC0415
    import hmac  # noqa: PLC0415

    key = FINGERPRINT_KEY.get_secret_value()
    expected = hmac.new(key, TEST_PANS[0].encode(), hashlib.sha256).hexdigest()
    assert expected == fingerprint(Pan(TEST_PANS[0]), FINGERPRINT_KEY)
