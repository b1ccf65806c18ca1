"""Card value types: Pan, SecurityCode and CardData, masked by construction.

A Pan is deliberately not a str subclass: json.dumps, concatenation and str methods would all
see the digits (STYLE leak 1). Every rendering is masked and reveal() is the only way out.
Validation errors never echo their input (STYLE leak 5).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac

from relay.errors import InvalidCardData
from relay.secrets import Masked

# Cybersource three-digit card type codes (wire notes, section 6).
VISA = "001"
MASTERCARD = "002"
AMEX = "003"
DISCOVER = "004"
DINERS = "005"
JCB = "007"
MAESTRO = "042"
UNIONPAY = "062"

CARD_TYPE_NAMES: dict[str, str] = {
    VISA: "Visa",
    MASTERCARD: "Mastercard",
    AMEX: "American Express",
    DISCOVER: "Discover",
    DINERS: "Diners Club",
    JCB: "JCB",
    MAESTRO: "Maestro",
    UNIONPAY: "China UnionPay",
}

# (first, last) prefix ranges of equal length, most specific first; checked against the BIN.
_BIN_RANGES: tuple[tuple[str, str, str], ...] = (
    ("622126", "622925", DISCOVER),  # co-branded Discover range inside UnionPay's 62
    ("3528", "3589", JCB),
    ("2221", "2720", MASTERCARD),
    ("6011", "6011", DISCOVER),
    ("3095", "3095", DINERS),
    ("6304", "6304", MAESTRO),
    ("6759", "6759", MAESTRO),
    ("644", "649", DISCOVER),
    ("300", "305", DINERS),
    ("34", "34", AMEX),
    ("37", "37", AMEX),
    ("36", "36", DINERS),
    ("38", "39", DINERS),
    ("51", "55", MASTERCARD),
    ("65", "65", DISCOVER),
    ("62", "62", UNIONPAY),
    ("50", "50", MAESTRO),
    ("56", "58", MAESTRO),
    ("67", "67", MAESTRO),
    ("4", "4", VISA),
)


def luhn_ok(digits: str) -> bool:
    """Check the Luhn (mod 10) checksum of a string of ASCII digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def detect_card_type(bin_digits: str) -> str | None:
    """Return the Cybersource card type code for a BIN (or longer prefix), or None."""
    for first, last, code in _BIN_RANGES:
        prefix = bin_digits[: len(first)]
        if len(prefix) == len(first) and first <= prefix <= last:
            return code
    return None


class Pan(Masked):
    """A primary account number. Every rendering is masked; reveal() is the only way out."""

    __slots__ = ("_digits",)

    def __init__(self, digits: str) -> None:
        """Validate digits (13 to 19 ASCII digits passing Luhn) without ever echoing them."""
        if not (
            isinstance(digits, str)
            and digits.isascii()
            and digits.isdigit()
            and 13 <= len(digits) <= 19
            and luhn_ok(digits)
        ):
            raise InvalidCardData("not a valid card number")
        self._digits = digits

    @property
    def bin(self) -> str:
        """The first six digits (the BIN/IIN), which PCI DSS allows in clear."""
        return self._digits[:6]

    @property
    def last4(self) -> str:
        """The last four digits, which PCI DSS allows in clear."""
        return self._digits[-4:]

    @property
    def masked(self) -> str:
        """Flex's maskedValue form: X for every digit but the last four."""
        return "X" * (len(self._digits) - 4) + self.last4

    @property
    def card_type(self) -> str | None:
        """The Cybersource card type code detected from the BIN, or None."""
        return detect_card_type(self._digits[:8])

    def __len__(self) -> int:
        """The number of digits, which is not secret."""
        return len(self._digits)

    def reveal(self) -> str:
        """Return the full digits. Called only where the card is encrypted or stored."""
        return self._digits

    def __repr__(self) -> str:
        """Render the masked form."""
        return f"Pan({self.masked})"

    def __eq__(self, other: object) -> bool:
        """Compare in constant time."""
        if not isinstance(other, Pan):
            return NotImplemented
        return hmac.compare_digest(self._digits, other._digits)

    def __hash__(self) -> int:
        """Hash by the clear parts only, so a hash table never keys on the secret digits."""
        return hash((self.bin, self.last4, len(self._digits)))


class SecurityCode(Masked):
    """A card security code (CVV/CVC/CID). Masked in every rendering, like Pan."""

    __slots__ = ("_digits",)

    def __init__(self, digits: str) -> None:
        """Validate 3 or 4 ASCII digits without echoing them."""
        if not (
            isinstance(digits, str)
            and digits.isascii()
            and digits.isdigit()
            and len(digits) in (3, 4)
        ):
            raise InvalidCardData("not a valid security code")
        self._digits = digits

    def reveal(self) -> str:
        """Return the digits. Called only where the card is encrypted or stored."""
        return self._digits

    def __repr__(self) -> str:
        """Render a fixed mask."""
        return "SecurityCode(***)"

    def __eq__(self, other: object) -> bool:
        """Compare in constant time."""
        if not isinstance(other, SecurityCode):
            return NotImplemented
        return hmac.compare_digest(self._digits, other._digits)

    def __hash__(self) -> int:
        """Hash by identity: a security code is never a key."""
        return id(self)


def parse_expiry(month: str | int, year: str | int) -> tuple[int, int]:
    """Parse an expiry month (1-12) and a year (two or four digits) into (month, yyyy)."""
    month_text, year_text = str(month).strip(), str(year).strip()
    if not all(text.isascii() and text.isdigit() for text in (month_text, year_text)):
        raise InvalidCardData("expiry month and year must be numbers")
    month_value, year_value = int(month_text), int(year_text)
    if not 1 <= month_value <= 12:
        raise InvalidCardData("expiry month must be 1 to 12")
    if len(year_text) == 2:
        year_value += 2000
    if not 2000 <= year_value <= 2099:
        raise InvalidCardData("expiry year must be 20YY or YY")
    return month_value, year_value


def expiry_passed(month: int, year: int, today: dt.date) -> bool:
    """A card is valid through the last day of its expiry month."""
    return (year, month) < (today.year, today.month)


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class CardData:
    """A card as the PCI side holds it in memory: never rendered beyond BIN, last 4 and type."""

    pan: Pan
    expiration_month: int
    expiration_year: int
    security_code: SecurityCode | None = None
    card_type: str | None = None

    def __post_init__(self) -> None:
        """Normalise the expiry to (1-12, yyyy) and default the card type from the BIN."""
        month, year = parse_expiry(self.expiration_month, self.expiration_year)
        object.__setattr__(self, "expiration_month", month)
        object.__setattr__(self, "expiration_year", year)
        if self.card_type is None:
            object.__setattr__(self, "card_type", self.pan.card_type)
        elif not (
            len(self.card_type) == 3 and self.card_type.isascii() and self.card_type.isdigit()
        ):
            raise InvalidCardData("card type must be a three-digit Cybersource code")

    def __repr__(self) -> str:
        """Render only what PCI DSS allows in clear, leaving out the expiry and the code."""
        has_code = self.security_code is not None
        return f"CardData(pan={self.pan!r}, card_type={self.card_type}, security_code={has_code})"

    __str__ = __repr__

    def __structlog__(self) -> str:
        """Render the masked form in structlog's JSONRenderer."""
        return repr(self)
