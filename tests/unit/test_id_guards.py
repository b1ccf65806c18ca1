"""Ids are shown in clear everywhere, so neither side accepts one that carries a card number."""

from __future__ import annotations

import pytest

from merchant_side.gateway import Gateway, TokenRequest
from pci_side.tokenize import Tokenizer, TokenizeRequest
from pci_side.vault import CardVault
from relay.config import ServerConfig
from relay.errors import ConfigError, InvalidRequest
from relay.ids import holds_card_number
from relay.serving import server_credentials
from tests.cards_testdata import TEST_PANS

VISA = TEST_PANS[0]


def grouped(digits: str, separator: str) -> str:
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


@pytest.mark.parametrize("separator", ["", " ", "-"])
def test_card_numbers_are_found_plain_or_grouped_by_one_space_or_dash(separator: str) -> None:
    """A Luhn-valid 16-digit number counts plain, or in groups joined by one space or dash."""
    assert holds_card_number(f"order-{grouped(VISA, separator)}")


@pytest.mark.parametrize("separator", [".", "_", ":", "/", "\t", "  ", "--", " - "])
def test_other_separators_end_a_group_of_digits(separator: str) -> None:
    """Groups joined by anything but one space or one dash are separate numbers, none 13 long."""
    assert not holds_card_number(f"order-{grouped(VISA, separator)}")


# Named, not shown: a test id would print the digits (tests/cards_testdata.py).
PRINTED = {
    "amex_4_6_5": "3782 822463 10005",
    "diners_4_6_4": "3056 930902 5904",
    "diners_in_fours_with_a_short_tail": "3056 9309 0259 04",
    "nineteen_digits": "6011 0000 0000 0000 001",
    "between_words": "x 4111 1111 1111 1111 y",
    "some_of_the_groups": "2026 4111 1111 1111 1111",
    "after_an_underscore": "order_4111-1111-1111-1111",
}
NOT_PRINTED = {
    "two_digit_group_first": "41 1111 1111 1111 11",
    "eight_digit_group_first": "41111111 1111 1111",
    "short_group_inside": "4111 1111 1111 11 11",
    "letter_before": "x4111 1111 1111 1111",
    "letter_after": "4111 1111 1111 1111y",
}


@pytest.mark.parametrize("text", PRINTED.values(), ids=PRINTED.keys())
def test_printed_card_numbers_are_found(text: str) -> None:
    """Groups of 3 to 6 digits (and a short tail) that hold a Luhn-valid 13 to 19 digits count."""
    assert holds_card_number(text)


@pytest.mark.parametrize("text", NOT_PRINTED.values(), ids=NOT_PRINTED.keys())
def test_groups_that_are_not_printed_card_numbers_are_not_found(text: str) -> None:
    """Groups of 1-2 digits (but a tail) or 7 and more, or glued to letters, end the stretch."""
    assert not holds_card_number(text)


@pytest.mark.parametrize(
    "text",
    [
        "order-1234",
        "card-0001",
        "2026-11-23T12:07:37Z",
        "demo-visa-1",
        "order-2026-12-02-123456789",
        "a39e9ead-4b30-4a4c-abe1-56ade08d8f88",
        "00000000-1234-4567-8901-000000000000",
        "01KB3M5Z8Q7X2N4R6T9V0W1Y3C",
    ],
)
def test_ordinary_ids_are_not_card_numbers(text: str) -> None:
    """Short digit runs, dates, UUIDs, ULIDs and names are fine."""
    assert not holds_card_number(text)


@pytest.mark.parametrize(
    ("request_id", "card_ref"),
    [(f"order-{VISA}", "card-1"), ("order-1", VISA)],
    ids=["in_request_id", "as_card_ref"],
)
async def test_pci_side_refuses_ids_holding_a_card_number(
    request_id: str, card_ref: str, vault: CardVault
) -> None:
    """PciRelay refuses the request before Flex (absent here); its record holds no such id."""
    tokenizer = Tokenizer(vault, None, None, receipts=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="must not contain a card number"):
        await tokenizer.tokenize("m1", TokenizeRequest(request_id, "cc", card_ref))
    [stored] = await vault.audit_entries(limit=1)
    entry = stored.entry
    assert ("failure", "INVALID_REQUEST") == (entry.outcome, entry.reason)
    # The id holding the number is recorded as "", the other as it was.
    expected = tuple("" if holds_card_number(v) else v for v in (request_id, card_ref))
    assert expected == (entry.request_id, entry.card_ref)


@pytest.mark.parametrize(
    ("request_id", "card_ref"),
    [(f"order-{VISA}", "card-1"), ("order-1", VISA)],
    ids=["in_request_id", "as_card_ref"],
)
async def test_merchant_side_refuses_ids_holding_a_card_number(
    request_id: str, card_ref: str
) -> None:
    """The gateway refuses the request before touching the ledger or Flex (both absent here)."""
    gateway = Gateway(None, None, None)  # type: ignore[arg-type]
    request = TokenRequest(request_id, card_ref, app_id="a")
    with pytest.raises(InvalidRequest, match="must not contain a card number"):
        await gateway.request_token(request, None, deadline=1)  # type: ignore[arg-type]


async def test_both_sides_name_the_request_of_a_malformed_card_ref(vault: CardVault) -> None:
    """A bad card_ref is reported with its (good) request_id, the same way on both sides."""
    gateway = Gateway(None, None, None)  # type: ignore[arg-type]
    tokenizer = Tokenizer(vault, None, None, receipts=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as merchant:
        await gateway.request_token(TokenRequest("order-1", "card 1", app_id="a"), None, deadline=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as pci:
        await tokenizer.tokenize("m1", TokenizeRequest("order-1", "cc", "card 1"))
    expected = (
        "card_ref must be 1-64 characters of A-Z a-z 0-9 _ . : -",
        {"request_id": "order-1"},
    )
    assert expected == (merchant.value.message, merchant.value.ids)
    assert expected == (pci.value.message, pci.value.ids)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "pci.example"])  # noqa: S104  refused
def test_insecure_dev_refuses_to_serve_beyond_loopback(host: str) -> None:
    """Plaintext is for a developer's loopback: any other bind address is a config error."""
    with pytest.raises(ConfigError, match="loopback"):
        server_credentials(ServerConfig(host=host, insecure_dev=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_insecure_dev_on_loopback_is_plaintext(host: str) -> None:
    """On loopback --insecure-dev gives no credentials (plaintext)."""
    assert server_credentials(ServerConfig(host=host, insecure_dev=True)) is None
