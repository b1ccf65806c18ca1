"""Pan, SecurityCode and CardData: validation, card types, expiry, masking in every rendering."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import pickle

import pytest
import structlog

from relay import cards
from relay.cards import (
    CardData,
    Pan,
    SecurityCode,
    detect_card_type,
    expiry_passed,
    luhn_ok,
    parse_expiry,
)
from relay.errors import InvalidCardData
from tests.cards_testdata import TEST_CARDS, TEST_CVVS, TEST_PANS, find_test_pans, masked_hint

VISA = TEST_PANS[0]
VISA_MASKED = "Pan(XXXXXXXXXXXX1111)"
AMEX = TEST_PANS[6]


def _card_id(card: object) -> str:
    return repr(card)


def _arabic_indic(digits: str) -> str:
    return "".join(chr(0x660 + int(d)) for d in digits)


def _fullwidth(digits: str) -> str:
    return "".join(chr(0xFF10 + int(d)) for d in digits)


def _card() -> CardData:
    return CardData(Pan(VISA), 12, 2031, SecurityCode(TEST_CVVS[0]))


# Luhn


@pytest.mark.parametrize("digits", ["0", "18", "79927398713", *TEST_PANS], ids=masked_hint)
def test_luhn_accepts_valid_numbers(digits):
    """Known-valid numbers, every test PAN included, pass the Luhn check."""
    assert luhn_ok(digits) is True


@pytest.mark.parametrize(
    "digits", ["1", "79927398710", "4111111111111112", "1234567812345678"], ids=masked_hint
)
def test_luhn_rejects_invalid_numbers(digits):
    """A wrong check digit fails the Luhn check."""
    assert luhn_ok(digits) is False


# Pan validation

INVALID_PAN_TEXTS = {
    "dashes": "4111-1111-1111-1111",
    "spaces": "4111 1111 1111 1111",
    "letter": VISA[:-1] + "a",
    "trailing_newline": VISA + "\n",
    "leading_plus": "+" + VISA,
    "empty": "",
    "too_short_luhn_valid": "411111111117",
    "too_long_luhn_valid": "41111111111111111115",
    "bad_luhn": "4111111111111112",
    "arabic_indic_digits": _arabic_indic(VISA),
    "fullwidth_digits": _fullwidth(VISA),
}


@pytest.mark.parametrize("text", INVALID_PAN_TEXTS.values(), ids=INVALID_PAN_TEXTS.keys())
def test_pan_rejects_malformed_text_without_echoing_it(text):
    """Malformed input raises InvalidCardData with a fixed message that holds none of it."""
    with pytest.raises(InvalidCardData) as info:
        Pan(text)
    assert ("not a valid card number",) == info.value.args


@pytest.mark.parametrize(
    "value",
    [int(VISA), VISA.encode(), bytearray(VISA.encode()), None, [VISA]],
    ids=["int", "bytes", "bytearray", "none", "list"],
)
def test_pan_rejects_non_str_input_without_echoing_it(value):
    """A non-str value raises InvalidCardData (not TypeError or AttributeError), fixed message."""
    with pytest.raises(InvalidCardData) as info:
        Pan(value)
    assert "not a valid card number" == str(info.value)


def test_pan_exposes_only_what_pci_dss_allows_in_clear():
    """bin, last4, masked and len show the first six and last four digits at most."""
    pan = Pan(VISA)
    assert ("411111", "1111", "XXXXXXXXXXXX1111", 16) == (pan.bin, pan.last4, pan.masked, len(pan))


def test_an_amex_pan_masks_to_its_own_length():
    """A 15-digit Amex PAN keeps 11 X and its last four digits."""
    assert "XXXXXXXXXXX0005" == Pan(AMEX).masked


def test_reveal_returns_the_digits():
    """reveal() is the one way to get the digits back."""
    digits = Pan(VISA).reveal()
    assert digits == VISA


def test_pans_compare_by_value():
    """Two Pans of the same digits are equal and hash alike; different digits are not equal."""
    assert (True, False, True) == (
        Pan(VISA) == Pan(VISA),
        Pan(VISA) == Pan(TEST_PANS[1]),
        hash(Pan(VISA)) == hash(Pan(VISA)),
    )


def test_a_pan_never_equals_its_digits():
    """A Pan is not a str, so it is never equal to (or concatenable with) a string."""
    assert (False, False) == (isinstance(Pan(VISA), str), Pan(VISA) == VISA)


# Card types


@pytest.mark.parametrize("card", TEST_CARDS, ids=_card_id)
def test_every_test_pan_is_detected_as_its_card_type(card):
    """Each test PAN validates and is detected as its listed Cybersource card type code."""
    assert card.card_type == Pan(card.digits).card_type


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("622126", cards.DISCOVER),
        ("622925", cards.DISCOVER),
        ("622127", cards.DISCOVER),
        ("622125", cards.UNIONPAY),
        ("622926", cards.UNIONPAY),
        ("2221", cards.MASTERCARD),
        ("2720", cards.MASTERCARD),
        ("2721", None),
        ("3528", cards.JCB),
        ("3527", None),
        ("9", None),
        ("", None),
    ],
)
def test_card_type_range_edges(prefix, expected):
    """BIN range bounds are inclusive, and the Discover range inside UnionPay's 62 wins."""
    assert expected == detect_card_type(prefix)


def test_every_card_type_code_has_a_name():
    """Each code a test card uses is one of the named Cybersource codes."""
    assert set() == {card.card_type for card in TEST_CARDS} - set(cards.CARD_TYPE_NAMES)


# Pan in every rendering


def test_pan_renders_masked_in_every_text_form():
    """repr, str, f-strings with any spec, %-formatting and str.format all print the mask."""
    pan = Pan(VISA)
    renderings = [
        repr(pan),
        str(pan),
        f"{pan}",
        f"{pan!r}",
        f"{pan:>40}",
        "%s" % pan,  # noqa: UP031  %-formatting is one of the renderings under test
        "%r" % pan,  # noqa: UP031  as above
        "{}".format(pan),  # noqa: UP032  str.format is one of the renderings under test
        "{!r}".format(pan),  # noqa: UP032  as above
    ]
    assert [VISA_MASKED] * len(renderings) == renderings


def test_pan_renders_masked_in_json_with_a_str_default():
    """json.dumps(default=str) falls back to the masked str."""
    assert '{"pan": "Pan(XXXXXXXXXXXX1111)"}' == json.dumps({"pan": Pan(VISA)}, default=str)


def test_json_refuses_a_pan_without_a_default():
    """Plain json.dumps raises TypeError naming the type, not the digits (STYLE leak 1)."""
    with pytest.raises(TypeError) as info:
        json.dumps({"pan": Pan(VISA)})
    assert "Object of type Pan is not JSON serializable" == str(info.value)


def test_pan_renders_masked_in_structlog_json():
    """structlog's JSONRenderer uses __structlog__, the masked form."""
    line = structlog.processors.JSONRenderer()(None, "info", {"pan": Pan(VISA)})
    assert '{"pan": "Pan(XXXXXXXXXXXX1111)"}' == line


def test_concatenating_a_pan_with_text_raises():
    """Adding a Pan to text raises TypeError instead of producing the digits."""
    with pytest.raises(TypeError):
        "card " + Pan(VISA)  # type: ignore[operator]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_a_pan_is_refused(protocol):
    """Every pickle protocol raises TypeError."""
    with pytest.raises(TypeError) as info:
        pickle.dumps(Pan(VISA), protocol=protocol)
    assert "Pan is not serializable" == str(info.value)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy], ids=["copy", "deepcopy"])
def test_copying_a_pan_is_refused(copier):
    """copy and deepcopy go through __reduce__ and raise TypeError."""
    with pytest.raises(TypeError) as info:
        copier(Pan(VISA))
    assert "Pan is not serializable" == str(info.value)


def _reject(digits: str) -> None:
    pan = Pan(digits)
    clear = pan.reveal()  # a plain str local, as a locals-showing renderer would print it
    raise ValueError("card rejected: " + repr(pan) + f" of length {len(clear)}")


def test_a_traceback_with_card_locals_is_masked_through_the_logging_pipeline(log_stream):
    """A frame holding a Pan and its digits as locals renders, via configure_logging, maskedly."""
    try:
        _reject(VISA)
    except ValueError:
        structlog.get_logger().exception("card_rejected")
    line = json.loads(log_stream.getvalue())
    leaked = find_test_pans(line["exception"])
    last_line = line["exception"].splitlines()[-1]
    assert ([], "ValueError: card rejected: Pan(XXXXXXXXXXXX1111) of length 16") == (
        leaked,
        last_line,
    )


# SecurityCode


@pytest.mark.parametrize("digits", ["12", "12345", "12a", " 123", "", _arabic_indic("123"), None])
def test_security_code_rejects_malformed_input_without_echoing_it(digits):
    """A code that is not 3 or 4 ASCII digits raises InvalidCardData with a fixed message."""
    with pytest.raises(InvalidCardData) as info:
        SecurityCode(digits)
    assert "not a valid security code" == str(info.value)


@pytest.mark.parametrize("digits", TEST_CVVS)
def test_security_code_renders_a_fixed_mask_every_way(digits):
    """repr, str, format, %s, JSON fallbacks and JSONRenderer print SecurityCode(***)."""
    code = SecurityCode(digits)
    renderings = [
        repr(code),
        str(code),
        f"{code}",
        f"{code:>10}",
        "%s" % code,  # noqa: UP031  %-formatting is one of the renderings under test
        json.loads(json.dumps(code, default=str)),
        json.loads(structlog.processors.JSONRenderer()(None, "info", {"c": code}))["c"],
    ]
    assert ["SecurityCode(***)"] * len(renderings) == renderings


def test_security_code_reveals_and_compares_by_value():
    """reveal() returns the digits; equal digits compare equal."""
    code = SecurityCode("737")
    assert ("737", True, False) == (
        code.reveal(),
        code == SecurityCode("737"),
        code == SecurityCode("738"),
    )


@pytest.mark.parametrize(
    "serialize", [pickle.dumps, copy.deepcopy, json.dumps], ids=["pickle", "deepcopy", "json"]
)
def test_serializing_a_security_code_is_refused(serialize):
    """pickle, deepcopy and plain json.dumps raise TypeError."""
    with pytest.raises(TypeError):
        serialize(SecurityCode("123"))


# CardData


def test_card_data_renders_only_the_masked_pan_type_and_code_presence():
    """repr, str, f-string and JSONRenderer show the masked PAN, type, code presence: no expiry."""
    card = _card()
    expected = "CardData(pan=Pan(XXXXXXXXXXXX1111), card_type=001, security_code=True)"
    renderings = [
        repr(card),
        str(card),
        f"{card}",
        "%s" % (card,),  # noqa: UP031  %-formatting is one of the renderings under test
        json.loads(json.dumps(card, default=str)),
        json.loads(structlog.processors.JSONRenderer()(None, "info", {"card": card}))["card"],
    ]
    assert [expected] * len(renderings) == renderings


@pytest.mark.parametrize(
    "serialize",
    [pickle.dumps, copy.deepcopy, dataclasses.asdict, dataclasses.astuple, json.dumps],
    ids=["pickle", "deepcopy", "asdict", "astuple", "json"],
)
def test_serializing_card_data_is_refused(serialize):
    """pickle, deepcopy, dataclasses.asdict/astuple and plain json.dumps raise TypeError."""
    with pytest.raises(TypeError):
        serialize(_card())


def test_card_data_defaults_the_card_type_from_the_bin():
    """Without an explicit card_type, the type detected from the PAN is used."""
    assert cards.AMEX == CardData(Pan(AMEX), 1, 2030).card_type


@pytest.mark.parametrize(
    ("month", "year", "card_type"),
    [(13, 2030, None), (0, 2030, None), (12, 1999, None), (12, 2030, "01"), (12, 2030, "abc")],
)
def test_card_data_validates_expiry_and_card_type(month, year, card_type):
    """A bad expiry month or year or a malformed card type raises InvalidCardData."""
    with pytest.raises(InvalidCardData):
        CardData(Pan(VISA), month, year, card_type=card_type)


def test_card_data_normalizes_a_two_digit_year():
    """CardData(.., 12, 31) validates as 2031 and should hold 2031, as parse_expiry returns."""
    assert 2031 == CardData(Pan(VISA), 12, 31).expiration_year


def test_card_data_rejects_a_non_ascii_card_type():
    """A card type of Arabic-Indic digits is not a Cybersource code."""
    with pytest.raises(InvalidCardData):
        CardData(Pan(VISA), 12, 2030, card_type=_arabic_indic("001"))


# Expiry


@pytest.mark.parametrize(
    ("month", "year", "expected"),
    [
        ("1", "2030", (1, 2030)),
        ("12", "30", (12, 2030)),
        (" 07 ", " 2031 ", (7, 2031)),
        (12, 2099, (12, 2099)),
        ("01", "00", (1, 2000)),
    ],
)
def test_parse_expiry_accepts_one_or_two_digit_months_and_two_or_four_digit_years(
    month, year, expected
):
    """Months 1-12 and years YY or 20YY parse into (month, yyyy)."""
    assert expected == parse_expiry(month, year)


@pytest.mark.parametrize(
    ("month", "year", "message"),
    [
        ("0", "2030", "expiry month must be 1 to 12"),
        ("13", "2030", "expiry month must be 1 to 12"),
        ("12", "1999", "expiry year must be 20YY or YY"),
        ("12", "2100", "expiry year must be 20YY or YY"),
        ("12", "5", "expiry year must be 20YY or YY"),
        ("12", "205", "expiry year must be 20YY or YY"),
        ("ab", "2030", "expiry month and year must be numbers"),
        ("12", "", "expiry month and year must be numbers"),
        ("12", "20 30", "expiry month and year must be numbers"),
    ],
)
def test_parse_expiry_rejects_out_of_range_and_non_numbers(month, year, message):
    """Out-of-range or non-numeric values raise InvalidCardData with a fixed message."""
    with pytest.raises(InvalidCardData) as info:
        parse_expiry(month, year)
    assert message == str(info.value)


@pytest.mark.parametrize(
    ("month", "year"),
    [("12", "+5"), ("1_2", "2030"), ("12", _arabic_indic("30"))],
    ids=["signed_year", "underscore_month", "arabic_indic_year"],
)
def test_parse_expiry_rejects_what_int_accepts_beyond_ascii_digits(month, year):
    """Only ASCII digits make an expiry: "+5" is not the year 2005."""
    with pytest.raises(InvalidCardData):
        parse_expiry(month, year)


@pytest.mark.parametrize(
    ("month", "year", "today", "expected"),
    [
        (11, 2026, dt.date(2026, 11, 30), False),
        (11, 2026, dt.date(2026, 11, 1), False),
        (10, 2026, dt.date(2026, 11, 1), True),
        (12, 2025, dt.date(2026, 1, 1), True),
        (1, 2027, dt.date(2026, 12, 31), False),
    ],
)
def test_expiry_passed_only_after_the_last_day_of_the_month(month, year, today, expected):
    """A card stays valid through the last day of its expiry month."""
    assert expected == expiry_passed(month, year, today)
