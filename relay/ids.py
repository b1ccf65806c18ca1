r"""The id vocabulary: what a request_id, a card_ref and a merchant_id may be, in one place.

Each kind has one length limit and one character set, matched with fullmatch ("$" would accept
a trailing newline):

    request_id    1-128 printable ASCII characters, no spaces   [\x21-\x7e]
    card_ref      1-64 characters of A-Z a-z 0-9 _ . : -
    merchant_id   1-64 characters of A-Z a-z 0-9 _ . : -
    app_id        1-64 characters of A-Z a-z 0-9 _ . : -   (a merchant's app, at the gateway)

Ids are shown in clear in log lines, audit records and gRPC statuses, so an id that holds a card
number (swapped columns, a careless caller) is refused as well. `holds_card_number` finds a card
number written as one, plain or printed in groups:

- a run of ASCII digits (any other character, letters included, ends it) in which a window of
  13 to 19 digits passes Luhn: the windowing of the log scrubber (`relay.logging.scrub_text`),
  so an id the scrubber would mask in a log line is refused;
- groups of 3 to 6 digits joined by one space or one dash, the way a number is printed
  (`4111 1111 1111 1111`, Amex `3782 822463 10005`), where some consecutive groups hold 13 to
  19 digits passing Luhn. A group is a whole token: a letter or digit touching it, or a group
  of 7 digits or more, breaks the stretch. A group of 1 or 2 digits ends it, as its last group:
  the tail of a number printed in fours (14-digit Diners `3056 9309 0259 04`).

The grouped rule is narrower than the scrubber's (which joins any digits separated by one space
or dash) on purpose, so that ordinary ids pass: dates (`order-2026-12-02-123456789`: groups of
2) and UUIDs (tokens of 8, 4, 4, 4 and 12 hex characters: at most three 4-digit groups, 12
digits) never hold a card number. The rule this replaces dropped every non-digit first and
refused about 92% of random UUIDs.

Every message names the id kind and the rule, never the value (STYLE section 3).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final, Literal

from relay.cards import luhn_ok
from relay.errors import InvalidRequest

__all__ = [
    "MAX_LENGTH",
    "IdKind",
    "check_app_id",
    "check_card_ref",
    "check_merchant_id",
    "check_request_id",
    "holds_card_number",
    "id_problem",
    "is_valid_id",
]

IdKind = Literal["request_id", "card_ref", "merchant_id", "app_id"]


@dataclasses.dataclass(frozen=True, slots=True)
class _Rule:
    pattern: re.Pattern[str]
    """Matched with fullmatch."""
    text: str
    """The rule in words, for messages."""


MAX_LENGTH: Final[dict[IdKind, int]] = {
    "request_id": 128,
    "card_ref": 64,
    "merchant_id": 64,
    "app_id": 64,
}
"""The one length limit of each kind; storage (the ledger, the vault) relies on it."""

_NAME_RULE: Final = _Rule(
    re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_LENGTH['card_ref']}}}"),
    f"1-{MAX_LENGTH['card_ref']} characters of A-Z a-z 0-9 _ . : -",
)
_RULES: Final[dict[IdKind, _Rule]] = {
    "request_id": _Rule(
        re.compile(rf"[\x21-\x7e]{{1,{MAX_LENGTH['request_id']}}}"),
        f"1-{MAX_LENGTH['request_id']} printable ASCII characters, no spaces",
    ),
    "card_ref": _NAME_RULE,
    "merchant_id": _NAME_RULE,
    "app_id": _NAME_RULE,
}

_CARD_NUMBER_ADVICE: Final = (
    "must not contain a card number: use an opaque id such as a UUID or ULID,"
    " or break long digit runs with a letter"
)

_PAN_LENGTHS: Final = range(13, 20)
_MIN_PAN: Final = _PAN_LENGTHS[0]
_MAX_PAN: Final = _PAN_LENGTHS[-1]

# As in the scrubber: a longer run is masked whole there, so it counts without a window scan
# (which would cost about 7 Luhn checks per digit).
_LONG_RUN: Final = 64

_DIGIT_RUN: Final = re.compile(r"[0-9]{13,}")

# A stretch of groups of 3 to 6 digits, and maybe a shorter tail, joined by one space or one
# dash; each group a whole token (no letter or digit touching it). Two full groups at least:
# fewer cannot hold 13 digits. The groups cannot be split two ways, so each match is a maximal
# stretch and the scan is linear.
_GROUP: Final = r"[0-9]{3,6}(?![0-9A-Za-z])"
_TAIL: Final = r"[0-9]{1,2}(?![0-9A-Za-z])"
_GROUPED: Final = re.compile(rf"(?<![0-9A-Za-z]){_GROUP}(?:[ -]{_GROUP})+(?:[ -]{_TAIL})?")
_JOIN: Final = re.compile(r"[ -]")
# 19 digits span at most seven groups (six of 3 and a tail of 1): the slice that keeps the
# scan of a long stretch linear.
_MAX_GROUPS: Final = 7

_DIGITS: Final = frozenset("0123456789")


def holds_card_number(text: str) -> bool:
    """Whether text holds a card number written as one, plain or in printed groups.

    See the module docstring for the rule. Text with fewer than 13 digits returns once they are
    counted (str.count, in C); otherwise two regex scans and a few Luhn checks per candidate
    keep the cost linear in the length of the text.
    """
    if sum(map(text.count, _DIGITS)) < _MIN_PAN:
        return False
    return any(_has_pan_window(run) for run in _DIGIT_RUN.findall(text)) or any(
        _has_grouped_pan(_JOIN.split(stretch)) for stretch in _GROUPED.findall(text)
    )


def _has_pan_window(digits: str) -> bool:
    """Whether some window of 13 to 19 digits passes Luhn (the scrubber's windowing)."""
    if len(digits) > _LONG_RUN:
        return True
    return any(
        luhn_ok(digits[start : start + length])
        for length in _PAN_LENGTHS
        for start in range(len(digits) - length + 1)
    )


def _has_grouped_pan(groups: list[str]) -> bool:
    """Whether some consecutive groups hold 13 to 19 digits passing Luhn."""
    for first in range(len(groups)):
        joined = ""
        for group in groups[first : first + _MAX_GROUPS]:
            joined += group
            if len(joined) > _MAX_PAN:
                break
            if len(joined) >= _MIN_PAN and luhn_ok(joined):
                return True
    return False


def id_problem(kind: IdKind, value: object) -> str | None:
    """What is wrong with value as an id of this kind, in words that never repeat it; or None.

    A card number is named first: told only about the alphabet, a caller would write the same
    number again with other separators.
    """
    if isinstance(value, str) and holds_card_number(value):
        return f"{kind} {_CARD_NUMBER_ADVICE}"
    rule = _RULES[kind]
    if not isinstance(value, str) or rule.pattern.fullmatch(value) is None:
        return f"{kind} must be {rule.text}"
    return None


def is_valid_id(kind: IdKind, value: object) -> bool:
    """Whether value is a good id of this kind: for callers that only need yes or no."""
    return id_problem(kind, value) is None


def check_request_id(value: object, **ids: str) -> str:
    """Return value if it is a good request_id, else raise InvalidRequest (with ids, if any)."""
    return _check("request_id", value, ids)


def check_card_ref(value: object, **ids: str) -> str:
    """Return value if it is a good card_ref, else raise InvalidRequest (with ids, if any)."""
    return _check("card_ref", value, ids)


def check_merchant_id(value: object, **ids: str) -> str:
    """Return value if it is a good merchant_id, else raise InvalidRequest (with ids, if any)."""
    return _check("merchant_id", value, ids)


def check_app_id(value: object, **ids: str) -> str:
    """Return value if it is a good app_id, else raise InvalidRequest (with ids, if any)."""
    return _check("app_id", value, ids)


def _check(kind: IdKind, value: object, ids: dict[str, str]) -> str:
    problem = id_problem(kind, value)
    if problem is not None:
        raise InvalidRequest(problem, **ids)
    assert isinstance(value, str)  # no problem means a str
    return value
