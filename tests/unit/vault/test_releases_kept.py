"""Released transient tokens kept with their success records: sealed at rest, handed back only
to the same request, and only while they live."""

from __future__ import annotations

import datetime as dt

import pytest

from pci_side.vault import AuditEntry, CardVault, Released
from pci_side.vault.errors import VaultIntegrityError
from relay.config import VaultConfig
from tests.vault_backends import run_sql

TOKEN = "eyJhbGciOiJSUzI1NiJ9.released-token-body.signature"


def released(expires_at: int, cc_jti: str = "cc-1") -> Released:
    """A release of TOKEN to m1's request order-1 on card-1."""
    return Released(cc_jti, "m1", "order-1", "card-1", TOKEN, "tt-1", expires_at)


async def keep(vault: CardVault, release: Released) -> None:
    """Record the success that made this release, and with it the release."""
    entry = AuditEntry(
        release.merchant_id, release.card_ref, release.request_id, release.cc_jti,
        release.tt_jti, "success", "",
    )  # fmt: skip
    await vault.record_attempt(entry, release)


def later(seconds: int) -> int:
    """Epoch seconds that far from now."""
    return int(dt.datetime.now(dt.UTC).timestamp()) + seconds


async def test_a_kept_release_comes_back_to_the_same_request(vault: CardVault) -> None:
    """The same cc_jti, merchant, request_id and card_ref get the token back."""
    await keep(vault, released(later(900)))
    kept = await vault.kept_release("cc-1", "m1", "order-1", "card-1")
    assert kept is not None
    assert (TOKEN, "tt-1") == (kept.token, kept.tt_jti)


@pytest.mark.parametrize(
    ("cc_jti", "merchant", "request_id", "card_ref"),
    [
        ("cc-2", "m1", "order-1", "card-1"),
        ("cc-1", "m2", "order-1", "card-1"),
        ("cc-1", "m1", "order-2", "card-1"),
        ("cc-1", "m1", "order-1", "card-2"),
    ],
)
async def test_another_request_gets_nothing(
    vault: CardVault, cc_jti: str, merchant: str, request_id: str, card_ref: str
) -> None:
    """Any other context, merchant, request_id or card_ref finds no release."""
    await keep(vault, released(later(900)))
    assert await vault.kept_release(cc_jti, merchant, request_id, card_ref) is None


async def test_an_expired_release_is_not_handed_back(vault: CardVault) -> None:
    """A token past its exp is of no use: none comes back."""
    await keep(vault, released(later(-1)))
    assert await vault.kept_release("cc-1", "m1", "order-1", "card-1") is None


async def test_the_first_release_of_a_context_wins(vault: CardVault) -> None:
    """A second release under the same cc_jti does not replace the first."""
    await keep(vault, released(later(900)))
    await keep(
        vault, Released("cc-1", "m1", "order-1", "card-1", "other.token.value", "tt-2", later(900))
    )
    kept = await vault.kept_release("cc-1", "m1", "order-1", "card-1")
    assert kept is not None
    assert "tt-1" == kept.tt_jti


async def test_the_token_is_sealed_at_rest_and_bound_to_its_context(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """The stored bytes hold no token text, and a seal moved to another context fails."""
    await keep(vault, released(later(900)))
    await keep(vault, released(later(900), cc_jti="cc-2"))
    rows = run_sql(vault_config, "SELECT cc_jti, sealed_token FROM releases ORDER BY cc_jti")
    assert [] == [cc for cc, sealed in rows if b"released-token-body" in bytes(sealed)]
    run_sql(
        vault_config,
        "UPDATE releases SET sealed_token = "
        "(SELECT sealed_token FROM releases WHERE cc_jti = 'cc-2') WHERE cc_jti = 'cc-1'",
    )
    with pytest.raises(VaultIntegrityError):
        await vault.kept_release("cc-1", "m1", "order-1", "card-1")


async def test_a_release_is_kept_in_the_transaction_of_its_success(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """The success record and its release are written together; the chain still verifies."""
    await keep(vault, released(later(900)))
    assert [("cc-1",)] == run_sql(vault_config, "SELECT cc_jti FROM releases")
    verdict = await vault.verify_audit()
    assert (True, 1) == (verdict.ok, verdict.checked)


async def test_a_release_whose_clear_columns_were_edited_does_not_open(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Rewriting who a release belongs to in the database breaks its seal: no token comes out."""
    await keep(vault, released(later(900)))
    run_sql(
        vault_config,
        "UPDATE releases SET merchant_id = 'm2', request_id = 'order-9', card_ref = 'card-9'",
    )
    with pytest.raises(VaultIntegrityError):
        await vault.kept_release("cc-1", "m2", "order-9", "card-9")


async def test_a_release_about_to_expire_is_not_handed_back(vault: CardVault) -> None:
    """A token with less than the margin left is of no use to a caller: none comes back."""
    await keep(vault, released(later(10)))
    assert await vault.kept_release("cc-1", "m1", "order-1", "card-1") is None
