"""The id vocabulary (relay.ids): ordinary ids pass, ids holding a card number never do."""

from __future__ import annotations

import base64
import random
import uuid

import pytest

from relay.errors import InvalidRequest
from relay.ids import (
    IdKind,
    check_card_ref,
    check_merchant_id,
    check_request_id,
    holds_card_number,
    id_problem,
    is_valid_id,
)
from relay.logging import scrub_text
from tests.cards_testdata import TEST_PANS, find_test_pans, masked_hint

KINDS: tuple[IdKind, ...] = ("request_id", "card_ref", "merchant_id")
CHECKS = {
    "request_id": check_request_id,
    "card_ref": check_card_ref,
    "merchant_id": check_merchant_id,
}
ADVICE = (
    "must not contain a card number: use an opaque id such as a UUID or ULID,"
    " or break long digit runs with a letter"
)
REQUEST_ID_RULE = "request_id must be 1-128 printable ASCII characters, no spaces"
NAME_RULE = "1-64 characters of A-Z a-z 0-9 _ . : -"

SAMPLES = 100_000
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
YEAR_MS = 365 * 24 * 3600 * 1000
# base64's RFC 4648 alphabet, translated to the Crockford one ULIDs use.
CROCKFORD = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
)


def seeded(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  reproducible test data, not a secret


def ulid(rng: random.Random) -> str:
    """A ULID: a 48-bit millisecond timestamp within a year of NOW_MS, then 80 random bits."""
    value = (NOW_MS + rng.randrange(-YEAR_MS, YEAR_MS)) << 80 | rng.getrandbits(80)
    # 20 bytes are 32 base32 characters; the last 26 hold the 128 bits (2 leading zero bits).
    return base64.b32encode(value.to_bytes(20, "big"))[6:].translate(CROCKFORD).decode()


def refused(kind: IdKind, values: list[str]) -> list[str]:
    return [value for value in values if not is_valid_id(kind, value)]


def in_fours(digits: str, separator: str) -> str:
    return separator.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def test_random_uuids_are_request_ids() -> None:
    """100,000 seeded and 100,000 system-random UUIDv4s: every one is accepted."""
    rng = seeded(20261202)
    from_seed = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(SAMPLES)]
    system = [str(uuid.uuid4()) for _ in range(SAMPLES)]
    assert [] == refused("request_id", from_seed)
    assert [] == refused("request_id", system)


def test_random_ulids_are_request_ids() -> None:
    """100,000 ULIDs around now: every one is accepted."""
    rng = seeded(20261203)
    ulids = [ulid(rng) for _ in range(SAMPLES)]
    assert {26} == {len(value) for value in ulids}
    assert [] == refused("request_id", ulids)


def test_dated_order_numbers_are_ids() -> None:
    """order-2026-12-02-NNNNNNNNN, for 10,000 random N, is a good id of every kind."""
    rng = seeded(20261204)
    orders = [f"order-2026-12-02-{rng.randrange(10**9):09d}" for _ in range(10_000)]
    assert [[], [], []] == [refused(kind, orders) for kind in KINDS]


@pytest.mark.parametrize("pan", TEST_PANS, ids=[masked_hint(pan) for pan in TEST_PANS])
def test_test_pans_are_refused_however_written(pan: str) -> None:
    """Every test PAN, plain, in fours, or inside an id, is refused as every kind of id."""
    spaced, dashed = in_fours(pan, " "), in_fours(pan, "-")
    written = [pan, spaced, dashed, f"order-{pan}-x", f"order-{spaced}-x", f"order-{dashed}-x"]
    written += [f"ref{pan}x", f"order:{dashed}"]
    for kind in KINDS:
        assert [f"{kind} {ADVICE}"] * len(written) == [id_problem(kind, text) for text in written]


@pytest.mark.parametrize("kind", KINDS)
def test_an_id_holding_a_card_number_says_what_to_use_instead(kind: IdKind) -> None:
    """InvalidRequest, reason INVALID_REQUEST, names the kind and the way out, never the value."""
    with pytest.raises(InvalidRequest) as info:
        CHECKS[kind](f"order-{TEST_PANS[0]}", request_id="order-1")
    assert (f"{kind} {ADVICE}", "INVALID_REQUEST") == (str(info.value), info.value.reason)
    assert {"request_id": "order-1"} == info.value.ids
    assert [] == find_test_pans(str(info.value))


def test_the_same_digit_runs_as_the_log_scrubber_are_card_numbers() -> None:
    """A plain digit run counts exactly when scrub_text would mask some of it."""
    rng = seeded(20261205)
    lengths = [12, 13, 19, 20, 64, 65, *(rng.randrange(1, 80) for _ in range(2_000))]
    runs = ["".join(rng.choices("0123456789", k=length)) for length in lengths]
    expected = [scrub_text(run) != run for run in runs]
    assert expected == [holds_card_number(run) for run in runs]
    assert any(expected)
    assert not all(expected)


LIMITS: dict[IdKind, tuple[list[object], list[object]]] = {
    "request_id": (
        [
            "r",
            "r" * 128,
            "".join(map(chr, range(0x21, 0x7F))),
            "a39e9ead-4b30-4a4c-abe1-56ade08d8f88",
        ],
        ["", "r" * 129, "a b", "a\tb", "a\x7f", "caf\u00e9", "abc\n", None, 12, b"abc"],
    ),
    "card_ref": (
        ["c", "c" * 64, "Az09_.:-", "visa-1"],
        ["", "c" * 65, "a b", "a/b", "a'b", "caf\u00e9", "abc\n", None, 12, b"abc"],
    ),
    "merchant_id": (
        ["m", "m" * 64, "Az09_.:-", "demo_merchant"],
        ["", "m" * 65, "a b", "a/b", "a'b", "caf\u00e9", "abc\n", None, 12, b"abc"],
    ),
}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_has_one_length_limit_and_one_alphabet(kind: IdKind) -> None:
    """The good values pass and come back unchanged; the bad ones get the kind's rule."""
    good, bad = LIMITS[kind]
    rule = REQUEST_ID_RULE if kind == "request_id" else f"{kind} must be {NAME_RULE}"
    assert good == [CHECKS[kind](value) for value in good]
    assert [rule] * len(bad) == [id_problem(kind, value) for value in bad]


@pytest.mark.parametrize("kind", KINDS)
def test_a_trailing_newline_is_refused(kind: IdKind) -> None:
    """fullmatch, not "$": an id followed by a newline is not the id."""
    with pytest.raises(InvalidRequest):
        CHECKS[kind]("order-1\n")


@pytest.mark.parametrize("kind", KINDS)
def test_the_message_never_contains_the_value(kind: IdKind) -> None:
    """Whatever is wrong, the message names the kind and the rule, not the value."""
    for value in ("secret value", "x" * 200, "order-1\n", f"pan {TEST_PANS[0]}"):
        with pytest.raises(InvalidRequest) as info:
            CHECKS[kind](value)
        assert (True, False) == (str(info.value).startswith(kind), value in str(info.value))


def test_a_long_stretch_of_groups_without_a_card_number_passes() -> None:
    """40,000 digit groups, none of them part of a Luhn-valid number: not a card number.

    (The scan is linear; a quadratic one took minutes on this input. Speed is measured, not
    asserted, in this suite.)
    """
    assert not holds_card_number("1000 " * 40_000)
