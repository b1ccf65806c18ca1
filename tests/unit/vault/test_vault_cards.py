"""Cards in and out of the vault, on both backends: round trip, masked listing, grant rules."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from pci_side.vault import CardVault, NewCard, open_vault
from relay import cards
from relay.cards import CardData, Pan, SecurityCode
from relay.config import VaultConfig
from relay.errors import CardNotFound, InvalidRequest, NotGranted
from tests.cards_testdata import TEST_CARDS, CardVector, find_test_pans

VISA, AMEX, DISCOVER = TEST_CARDS[0], TEST_CARDS[6], TEST_CARDS[8]


def card_of(vector: CardVector, code: str | None = None) -> CardData:
    return CardData(Pan(vector.digits), 7, 2031, SecurityCode(code) if code else None)


async def test_imported_cards_load_back_equal(vault: CardVault) -> None:
    """Each card, with or without a security code, decrypts to what was imported."""
    imported = {
        "visa-1": card_of(VISA, "123"),
        "amex-1": card_of(AMEX, "1234"),
        "disc-1": card_of(DISCOVER),
    }
    await vault.import_cards([NewCard(ref, card, ("m1",)) for ref, card in imported.items()])
    for ref, expected in imported.items():
        loaded = await vault.load_card(ref, "m1")
        assert expected.pan == loaded.pan
        assert expected.security_code == loaded.security_code
        fields = (expected.expiration_month, expected.expiration_year, expected.card_type)
        assert fields == (loaded.expiration_month, loaded.expiration_year, loaded.card_type)


async def test_list_cards_shows_only_masked_data(vault: CardVault) -> None:
    """A summary holds BIN, last 4, expiry, type and grants; no rendering of it holds the PAN."""
    await vault.import_cards([NewCard("visa-1", card_of(VISA, "123"), ("m2", "m1"))])
    [summary] = await vault.list_cards()
    clear = (summary.card_ref, summary.first6, summary.last4, summary.exp_month)
    assert ("visa-1", VISA.digits[:6], VISA.digits[-4:], 7) == clear
    assert (2031, cards.VISA, True, ("m1", "m2")) == (
        summary.exp_year,
        summary.card_type,
        summary.has_security_code,
        summary.merchants,
    )
    rendered = repr(summary) + json.dumps(dataclasses.asdict(summary), default=str)
    assert [] == find_test_pans(rendered)
    assert "123" not in rendered.replace(VISA.digits[:6], "")


async def test_list_cards_pages_by_card_ref(vault: CardVault) -> None:
    """list_cards returns card_refs in order, limit at a time, after a given card_ref."""
    refs = ["c-3", "a-1", "b-2", "B-0"]
    await vault.import_cards(
        [NewCard(ref, card_of(v)) for ref, v in zip(refs, TEST_CARDS, strict=False)]
    )
    first = await vault.list_cards(limit=2)
    rest = await vault.list_cards(limit=10, after=first[-1].card_ref)
    assert ["B-0", "a-1", "b-2", "c-3"] == [s.card_ref for s in first + rest]
    assert 4 == await vault.count_cards()


async def test_summary_times_come_from_the_clock_in_utc(vault_config: VaultConfig) -> None:
    """created_at and updated_at are the injected clock's time, read back exactly and in UTC."""
    moment = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    async with await open_vault(vault_config, clock=lambda: moment) as vault:
        await vault.import_cards([NewCard("visa-1", card_of(VISA))])
        [summary] = await vault.list_cards()
    assert (moment, moment, dt.timedelta(0)) == (
        summary.created_at,
        summary.updated_at,
        summary.created_at.utcoffset(),
    )


async def test_not_granted_answers_exactly_like_not_found(vault: CardVault) -> None:
    """A card not granted to the caller answers as an unknown one: same text, status and reason."""
    await vault.import_cards([NewCard("visa-1", card_of(VISA), ("m1",))])
    with pytest.raises(NotGranted) as not_granted:
        await vault.load_card("visa-1", "m2")
    with pytest.raises(CardNotFound) as unknown:
        await vault.load_card("visa-9", "m2")

    def answer(exc: CardNotFound) -> tuple[object, ...]:
        return (str(exc), exc.status, exc.reason)

    assert answer(unknown.value) == answer(not_granted.value)
    assert ("card not found", {"card_ref": "visa-1"}) == (
        str(not_granted.value),
        not_granted.value.ids,
    )
    assert {"card_ref": "visa-9"} == unknown.value.ids


async def test_grant_and_revoke_change_who_may_load(vault: CardVault) -> None:
    """grant returns True then False; after revoke the card answers as not granted."""
    await vault.import_cards([NewCard("visa-1", card_of(VISA))])
    assert [True, False] == [await vault.grant("visa-1", "m1"), await vault.grant("visa-1", "m1")]
    assert VISA.digits[-4:] == (await vault.load_card("visa-1", "m1")).pan.last4
    assert [True, False] == [await vault.revoke("visa-1", "m1"), await vault.revoke("visa-1", "m1")]
    with pytest.raises(NotGranted):
        await vault.load_card("visa-1", "m1")


async def test_grant_of_unknown_card_raises_card_not_found(vault: CardVault) -> None:
    """Granting a card that does not exist is CardNotFound, naming only the card_ref."""
    with pytest.raises(CardNotFound) as info:
        await vault.grant("nope", "m1")
    assert ("card not found", {"card_ref": "nope"}) == (str(info.value), info.value.ids)


async def test_grant_refuses_a_malformed_merchant_id(vault: CardVault) -> None:
    """A merchant id outside the id alphabet is refused before anything is written."""
    await vault.import_cards([NewCard("visa-1", card_of(VISA))])
    with pytest.raises(InvalidRequest) as info:
        await vault.grant("visa-1", "m 1")
    assert "merchant_id must be 1-64 characters of A-Z a-z 0-9 _ . : -" == str(info.value)


@pytest.mark.parametrize("card_ref", ["", "x" * 65, "a b", "a\n", "caf\u00e9", "a/b", "a'b"])
def test_new_card_refuses_a_malformed_card_ref(card_ref: str) -> None:
    """card_ref must be 1-64 characters of A-Z a-z 0-9 _ . : -, and the error never echoes it."""
    with pytest.raises(InvalidRequest) as info:
        NewCard(card_ref, card_of(VISA))
    assert "card_ref must be 1-64 characters of A-Z a-z 0-9 _ . : -" == str(info.value)


def test_new_card_sorts_and_dedupes_merchants() -> None:
    """Merchants are kept sorted and unique, so equal inputs give equal NewCards."""
    assert ("a", "b") == NewCard("x", card_of(VISA), ("b", "a", "b")).merchants


def test_new_card_repr_is_masked() -> None:
    """A NewCard renders its card masked."""
    assert [] == find_test_pans(repr(NewCard("x", card_of(VISA, "123"))))
