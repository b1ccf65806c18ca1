"""The test card numbers used across the suite, and the scan that proves none of them leaks.

The numbers are the networks' and processors' published test PANs (Cybersource, Stripe and
Braintree test card lists); each passes Luhn and is detected as its Cybersource type code, which
tests/unit/test_cards.py checks. None of them is a real account.

A full test PAN must never appear in output, so never print these strings, and parametrize over
them with ``ids=masked_hint`` (a plain string id would print the digits in the test name).
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from relay import cards


@dataclasses.dataclass(frozen=True, repr=False)
class CardVector:
    """A test PAN with its network and expected Cybersource card type code."""

    digits: str
    card_type: str
    network: str

    def __repr__(self) -> str:
        """Render without the full number, like everything else that holds one."""
        return f"CardVector({masked_hint(self.digits)}, {self.network})"


TEST_CARDS: tuple[CardVector, ...] = (
    CardVector("4111111111111111", cards.VISA, "Visa"),
    CardVector("4242424242424242", cards.VISA, "Visa"),
    CardVector("4000056655665556", cards.VISA, "Visa debit"),
    CardVector("5555555555554444", cards.MASTERCARD, "Mastercard"),
    CardVector("5105105105105100", cards.MASTERCARD, "Mastercard prepaid"),
    CardVector("2223003122003222", cards.MASTERCARD, "Mastercard 2-series"),
    CardVector("378282246310005", cards.AMEX, "American Express"),
    CardVector("371449635398431", cards.AMEX, "American Express"),
    CardVector("6011111111111117", cards.DISCOVER, "Discover"),
    CardVector("6011000990139424", cards.DISCOVER, "Discover"),
    CardVector("30569309025904", cards.DINERS, "Diners Club"),
    CardVector("36227206271667", cards.DINERS, "Diners Club"),
    CardVector("3530111333300000", cards.JCB, "JCB"),
    CardVector("3566002020360505", cards.JCB, "JCB"),
    CardVector("6759649826438453", cards.MAESTRO, "Maestro"),
    CardVector("6200000000000005", cards.UNIONPAY, "UnionPay"),
    CardVector("6212345678901265", cards.UNIONPAY, "UnionPay"),
)

TEST_PANS: tuple[str, ...] = tuple(card.digits for card in TEST_CARDS)
"""The digits of every test card, in the order of TEST_CARDS."""

TEST_CVVS: tuple[str, ...] = ("123", "737", "1234")
"""Test security codes. Too short to scan output for: they are checked by key, not by value."""

# A digit run where neighbouring digits may be separated by up to two characters that are not
# letters or digits: "4111 1111", "4111-1111", "4111, 1111", "4111\n1111". Broader than the
# scrubber's own pattern on purpose; a masked "411111XXXXXX1111" is broken up by the Xs.
_DIGIT_RUN = re.compile(r"[0-9](?:[^0-9A-Za-z]{0,2}[0-9])*")
_NOT_DIGIT = re.compile(r"[^0-9]")


def masked_hint(digits: str) -> str:
    """Name a card number in a message without printing it: "411111...1111"."""
    return f"{digits[:6]}...{digits[-4:]}"


def find_test_pans(text: str) -> list[str]:
    """Return the masked hints of the test PANs written out in full anywhere in text."""
    found: list[str] = []
    for run in _DIGIT_RUN.findall(text):
        digits = _NOT_DIGIT.sub("", run)
        if len(digits) < 13:
            continue
        found.extend(masked_hint(pan) for pan in TEST_PANS if pan in digits)
    return sorted(set(found))


def assert_no_test_pans(text: str, where: str) -> None:
    """Fail the current test, naming the PAN only masked, if text holds a test PAN in full."""
    leaked = find_test_pans(text)
    if leaked:
        pytest.fail(f"test PAN leaked in {where}: {', '.join(leaked)}", pytrace=False)
