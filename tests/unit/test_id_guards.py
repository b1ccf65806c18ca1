"""Ids are shown in clear everywhere, so neither side accepts one that carries a card number."""

from __future__ import annotations

import pytest

from merchant_side.gateway import Gateway, TokenRequest
from pci_side.tokenize import Tokenizer, TokenizeRequest
from relay.config import ServerConfig
from relay.errors import ConfigError, InvalidRequest
from relay.logging import looks_like_card_number
from relay.serving import server_credentials
from tests.cards_testdata import TEST_PANS

VISA = TEST_PANS[0]


@pytest.mark.parametrize("separator", ["", " ", "-", ".", "_", ":", "/", "\t", "  "])
def test_card_numbers_are_found_whatever_separates_their_digits(separator: str) -> None:
    """A Luhn-valid 16-digit run counts with any separator between its groups."""
    grouped = separator.join(VISA[i : i + 4] for i in range(0, 16, 4))
    assert looks_like_card_number(f"order-{grouped}")


@pytest.mark.parametrize("text", ["order-1234", "card-0001", "2026-11-23T12:07:37Z", "demo-visa-1"])
def test_ordinary_ids_are_not_card_numbers(text: str) -> None:
    """Short digit runs, dates and names are fine."""
    assert not looks_like_card_number(text)


@pytest.mark.parametrize(
    ("request_id", "card_ref"), [(f"order-{VISA}", "card-1"), ("order-1", VISA)]
)
async def test_pci_side_refuses_ids_holding_a_card_number(request_id: str, card_ref: str) -> None:
    """PciRelay refuses the request before touching the vault or Flex (both absent here)."""
    tokenizer = Tokenizer(None, None, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="must not contain a card number"):
        await tokenizer.tokenize("m1", TokenizeRequest(request_id, "cc", card_ref))


@pytest.mark.parametrize(
    ("request_id", "card_ref"), [(f"order-{VISA}", "card-1"), ("order-1", VISA)]
)
async def test_merchant_side_refuses_ids_holding_a_card_number(
    request_id: str, card_ref: str
) -> None:
    """The gateway refuses the request before touching the ledger or Flex (both absent here)."""
    gateway = Gateway(None, None, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="must not contain a card number"):
        await gateway.request_token(TokenRequest(request_id, card_ref), None, deadline=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "pci.example"])  # noqa: S104  refused
def test_insecure_dev_refuses_to_serve_beyond_loopback(host: str) -> None:
    """Plaintext is for a developer's loopback: any other bind address is a config error."""
    with pytest.raises(ConfigError, match="loopback"):
        server_credentials(ServerConfig(host=host, insecure_dev=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_insecure_dev_on_loopback_is_plaintext(host: str) -> None:
    """On loopback --insecure-dev gives no credentials (plaintext)."""
    assert server_credentials(ServerConfig(host=host, insecure_dev=True)) is None
