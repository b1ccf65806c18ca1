"""The card import file reader: line numbers, every kind of bad row, streaming, and no echo."""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterator

import pytest

from pci_side.cards_import import (
    MAX_LINE_BYTES,
    CardRow,
    ImportFileError,
    RejectedRow,
    Row,
    format_for,
    read_lines,
    read_rows,
)
from pci_side.progress import Progress
from relay import cards
from tests.cards_testdata import TEST_CARDS, TEST_CVVS

TODAY = dt.date(2025, 6, 15)
HEADER = "card_ref,pan,exp_month,exp_year,cvv,type,merchants"
VISA = TEST_CARDS[0].digits
AMEX = TEST_CARDS[6].digits
NOT_LUHN = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
CVV = TEST_CVVS[1]


def csv_rows(*lines: str, header: str = HEADER) -> list[Row]:
    return list(read_rows(io.StringIO("\n".join([header, *lines]) + "\n"), "csv", today=TODAY))


def jsonl_rows(*lines: str) -> list[Row]:
    return list(read_rows(io.StringIO("\n".join(lines) + "\n"), "jsonl", today=TODAY))


def messages(rows: list[Row]) -> list[str]:
    return [str(row) for row in rows if isinstance(row, RejectedRow)]


def test_a_valid_csv_row_becomes_a_card_row_on_line_2() -> None:
    """The header is line 1, so the first data row is line 2, with every field carried over."""
    [row] = csv_rows(f"card-1,{VISA},7,2030,{CVV},001,m1;m2 m3")
    assert isinstance(row, CardRow)
    assert (2, "card-1", ("m1", "m2", "m3")) == (row.line, row.card_ref, row.merchants)
    assert cards.CardData(
        cards.Pan(VISA), 7, 2030, cards.SecurityCode(CVV), cards.VISA
    ).__repr__() == repr(row.card)
    assert (cards.Pan(VISA), 7, 2030) == (
        row.card.pan,
        row.card.expiration_month,
        row.card.expiration_year,
    )


def test_optional_columns_may_be_left_out_of_the_header() -> None:
    """A header with only the four required columns, in another order, is enough."""
    [row] = csv_rows(f"26,1,{VISA},card-1", header="exp_year,exp_month,pan,card_ref")
    assert isinstance(row, CardRow)
    assert (1, 2026, None, cards.VISA, ()) == (
        row.card.expiration_month,
        row.card.expiration_year,
        row.card.security_code,
        row.card.card_type,
        row.merchants,
    )


@pytest.mark.parametrize(
    "pan",
    [" ".join([VISA[:4], VISA[4:8], VISA[8:12], VISA[12:]]), "-".join([AMEX[:4], AMEX[4:]])],
    ids=["spaced", "dashed"],
)
def test_spaced_and_dashed_pans_are_accepted(pan: str) -> None:
    """Spaces and dashes between digits are stripped before validation."""
    [row] = csv_rows(f"card-1,{pan},12,2030,,,")
    assert isinstance(row, CardRow)
    assert cards.Pan(pan.replace(" ", "").replace("-", "")) == row.card.pan


ID_RULE = "1-64 characters of A-Z a-z 0-9 _ . : -"
NO_CARD_NUMBER = (
    "must not contain a card number: use an opaque id such as a UUID or ULID,"
    " or break long digit runs with a letter"
)
TYPE_RULE = "type must be a three-digit Cybersource card type code"
CVV_RULE = "cvv must be a string of 3 or 4 digits"


def card_line(pan: str = VISA, month: str = "12", year: str = "2030", rest: str = ",,") -> str:
    return f"card-1,{pan},{month},{year},{rest}"


BAD_CSV_ROWS = {
    "too_few_fields": (f"card-1,{VISA},12,2030", "expected 7 fields, found 4"),
    "too_many_fields": (card_line(rest=",,,"), "expected 7 fields, found 8"),
    "bad_quoting": (f'card-1,"{VISA},12,2030,,,', "malformed CSV quoting"),
    "missing_pan": (card_line(pan=""), "missing pan"),
    "missing_card_ref": (f",{VISA},12,2030,,,", "missing card_ref"),
    "bad_card_ref": (f"card 1!,{VISA},12,2030,,,", f"card_ref must be {ID_RULE}"),
    "long_card_ref": (f"{'r' * 65},{VISA},12,2030,,,", f"card_ref must be {ID_RULE}"),
    "pan_as_card_ref": (f"{VISA},{VISA},12,2030,,,", f"card_ref {NO_CARD_NUMBER}"),
    "luhn": (card_line(NOT_LUHN), "pan fails the Luhn check"),
    "pan_letters": (card_line(VISA[:-1] + "a"), "pan must be digits (spaces and dashes allowed)"),
    "pan_short": (card_line(VISA[:12]), "pan must be 13 to 19 digits, found 12"),
    "pan_long": (card_line(VISA + "0000"), "pan must be 13 to 19 digits, found 20"),
    "month_13": (card_line(month="13"), "expiry month must be 1 to 12"),
    "month_0": (card_line(month="0"), "expiry month must be 1 to 12"),
    "month_word": (card_line(month="May"), "expiry month and year must be numbers"),
    "year_3_digits": (card_line(year="203"), "expiry year must be 20YY or YY"),
    "missing_year": (card_line(year=""), "missing exp_year"),
    "expired": (card_line(month="5", year="2025"), "card expired 05/2025"),
    "expired_2_digit_year": (card_line(year="24"), "card expired 12/2024"),
    "cvv_short": (card_line(rest="12,,"), CVV_RULE),
    "cvv_letters": (card_line(rest="12a,,"), CVV_RULE),
    "type_word": (card_line(rest=",visa,"), TYPE_RULE),
    "type_2_digits": (card_line(rest=",01,"), TYPE_RULE),
    "bad_merchant": (
        card_line(rest=",,m1;m/2"),
        f"merchants: entry 2: merchant_id must be {ID_RULE}",
    ),
    "pan_as_merchant": (
        card_line(rest=f",,m1;{VISA}"),
        f"merchants: entry 2: merchant_id {NO_CARD_NUMBER}",
    ),
    "two_merchant_problems": (
        card_line(rest=f",,{VISA};m/2;m1;m/4"),
        (
            f"merchants: entry 1: merchant_id {NO_CARD_NUMBER}; "
            f"merchants: entries 2, 4: merchant_id must be {ID_RULE}"
        ),
    ),
    "two_problems": (
        card_line(NOT_LUHN, rest=f"{CVV[:2]},,"),
        f"pan fails the Luhn check; {CVV_RULE}",
    ),
}


@pytest.mark.parametrize(("line", "expected"), BAD_CSV_ROWS.values(), ids=BAD_CSV_ROWS.keys())
def test_each_bad_csv_row_gets_its_exact_message(line: str, expected: str) -> None:
    """One RejectedRow naming the line and every problem, in a fixed wording."""
    assert [f"line 2: {expected}"] == messages(csv_rows(line))


def test_the_current_month_has_not_expired() -> None:
    """A card is valid through the last day of its expiry month (UTC today)."""
    assert [] == messages(csv_rows(f"card-1,{VISA},6,2025,,,"))


@pytest.mark.parametrize(("line", "expected"), BAD_CSV_ROWS.values(), ids=BAD_CSV_ROWS.keys())
def test_no_message_repeats_the_pan_the_cvv_or_the_line(line: str, expected: str) -> None:
    """Messages name what is wrong, never the values: not the PAN, its digits run, or the CVV."""
    [text] = messages(csv_rows(line))
    pan_digits = [VISA, NOT_LUHN, VISA[:-1], VISA[:12], AMEX]
    assert [] == [digits for digits in pan_digits if digits in text.replace(" ", "")]
    assert CVV not in text
    assert line not in text


def test_blank_lines_and_comments_are_skipped_but_counted() -> None:
    """Line numbers stay physical: blank and `#` lines (also before the header) still count."""
    text = "\n".join(
        [
            "# exported 2025-06-01",
            HEADER,
            "",
            f"card-1,{VISA},12,2030,,,",
            "   ",
            "  # a note",
            f"card-2,{NOT_LUHN},12,2030,,,",
        ]
    )
    rows = list(read_rows(io.StringIO(text), "csv", today=TODAY))
    assert [4, 7] == [row.line for row in rows]
    assert ["line 7: pan fails the Luhn check"] == messages(rows)


def test_a_duplicate_card_ref_names_the_first_line() -> None:
    """The later row is the error, naming the earlier line; the first row stays valid."""
    rows = csv_rows(
        f"card-1,{VISA},12,2030,,,",
        f"card-2,{AMEX},12,2030,,,",
        f"card-1,{AMEX},11,2031,,,",
    )
    assert [CardRow, CardRow, RejectedRow] == [type(row) for row in rows]
    assert ["line 4: duplicate card_ref card-1 (first on line 2)"] == messages(rows)


def test_a_duplicate_of_a_rejected_row_is_still_a_duplicate() -> None:
    """A card_ref named twice is ambiguous whether or not its first row was valid."""
    rows = csv_rows(f"card-1,{NOT_LUHN},12,2030,,,", f"card-1,{VISA},12,2030,,,")
    assert [
        "line 2: pan fails the Luhn check",
        "line 3: duplicate card_ref card-1 (first on line 2)",
    ] == messages(rows)


def test_a_crlf_file_with_a_bom_reads_like_any_other() -> None:
    """Windows exports (BOM, CRLF line ends) are read the same."""
    data = f"\ufeff{HEADER}\r\ncard-1,{VISA},12,2030,{CVV},,m1\r\n".encode()
    [row] = list(read_rows(read_lines(io.BytesIO(data)), "csv", today=TODAY))
    assert isinstance(row, CardRow)
    assert ("card-1", ("m1",)) == (row.card_ref, row.merchants)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("card_ref,pan,exp_month", "line 1: bad header row: missing columns exp_year"),
        (
            "card_ref,pan,exp_month,exp_year,colour",
            "line 1: bad header row: unknown columns colour",
        ),
        (
            "card_ref,pan,exp_month,exp_year,pan",
            "line 1: bad header row: a column is named twice",
        ),
        (
            f"card-1,{VISA},12,2030",
            (
                "line 1: bad header row: unknown columns (not shown); "
                "missing columns card_ref, pan, exp_month, exp_year"
            ),
        ),
    ],
    ids=["missing", "unknown", "twice", "data_instead_of_header"],
)
def test_a_bad_header_rejects_the_whole_file(header: str, expected: str) -> None:
    """Without a usable header nothing is read, and the message never repeats a data value."""
    with pytest.raises(ImportFileError) as info:
        csv_rows(f"card-1,{VISA},12,2030", header=header)
    assert expected == str(info.value)


def test_an_empty_csv_file_has_no_header() -> None:
    """A file with nothing but blank lines and comments is a file error, not zero rows."""
    with pytest.raises(ImportFileError) as info:
        list(read_rows(io.StringIO("\n# nothing\n"), "csv", today=TODAY))
    assert "no header row (card_ref,pan,exp_month,exp_year,...)" == str(info.value)


def jsonl(**values: object) -> str:
    return json.dumps(values)


def test_valid_json_lines_take_lists_strings_and_numbers() -> None:
    """merchants as a list or a string; expiry as numbers or strings."""
    rows = jsonl_rows(
        jsonl(card_ref="a", pan=VISA, exp_month=12, exp_year=2030, merchants=["m1", "m2"]),
        jsonl(card_ref="b", pan=AMEX, exp_month="01", exp_year="31", cvv="1234", merchants="m3"),
        jsonl(card_ref="c", pan=VISA, exp_month=1, exp_year=2030, cvv=None, type=None),
    )
    assert [CardRow] * 3 == [type(row) for row in rows]
    assert [("m1", "m2"), ("m3",), ()] == [
        row.merchants for row in rows if isinstance(row, CardRow)
    ]


def card_json(**changes: object) -> str:
    return json.dumps({"card_ref": "a", "pan": VISA, "exp_month": 1, "exp_year": 2030} | changes)


BAD_JSON_LINES = {
    "not_json": ('{"card_ref": "a", "pan": ', "not valid JSON"),
    "not_an_object": ("[1, 2]", "not a JSON object"),
    "unknown_key": (card_json(colour="red"), "unknown keys colour"),
    "pan_as_key": (card_json(**{VISA: 1}), "unknown keys (not shown)"),
    "missing_keys": (jsonl(card_ref="a", pan=VISA), "missing exp_month; missing exp_year"),
    "pan_number": (card_json(pan=int(VISA)), "pan must be a string"),
    "cvv_number": (card_json(cvv=737), CVV_RULE),
    "month_bool": (card_json(exp_month=True), "exp_month and exp_year must be numbers"),
    "merchants_object": (card_json(merchants={"m": 1}), "merchants must be a list or a string"),
    "merchant_number": (
        card_json(merchants=["m1", 7, "m 3"]),
        f"merchants: entries 2, 3: merchant_id must be {ID_RULE}",
    ),
}


@pytest.mark.parametrize(("line", "expected"), BAD_JSON_LINES.values(), ids=BAD_JSON_LINES.keys())
def test_each_bad_json_line_gets_its_exact_message(line: str, expected: str) -> None:
    """A bad JSON line is rejected alone, with its line number, and the next line still reads."""
    rows = jsonl_rows(line, jsonl(card_ref="z", pan=VISA, exp_month=1, exp_year=2030))
    assert [f"line 1: {expected}"] == messages(rows)
    assert [2] == [row.line for row in rows if isinstance(row, CardRow)]
    assert VISA not in messages(rows)[0]


def test_over_long_and_undecodable_lines_are_rejected_with_their_numbers() -> None:
    """read_lines cuts a runaway line, and both it and a non-UTF-8 line keep numbering exact."""
    data = b"".join(
        [
            HEADER.encode() + b"\n",
            b"x" * (MAX_LINE_BYTES * 3) + b"\n",
            b"card-1,\xff\xfe,12,2030,,,\n",
            f"card-2,{VISA},12,2030,,,\n".encode(),
        ]
    )
    rows = list(read_rows(read_lines(io.BytesIO(data)), "csv", today=TODAY))
    assert [
        f"line 2: line longer than {MAX_LINE_BYTES} bytes",
        "line 3: not valid UTF-8",
    ] == messages(rows)
    assert [4] == [row.line for row in rows if isinstance(row, CardRow)]


def test_rows_are_read_lazily() -> None:
    """The reader pulls a line only when the next row is asked for: the file is streamed."""
    pulled: list[int] = []

    def lines() -> Iterator[str]:
        yield HEADER
        for number in range(1, 1_000_000):
            pulled.append(number)
            yield f"card-{number},{VISA},12,2030,,,"

    rows = read_rows(lines(), "csv", today=TODAY)
    first = next(rows)
    assert (2, [1]) == (first.line, pulled)
    next(rows)
    assert [1, 2] == pulled


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cards.csv", "csv"), ("C.CSV", "csv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl")],
)
def test_format_from_the_extension(name: str, expected: str) -> None:
    """.csv is CSV; .jsonl and .ndjson are JSON Lines."""
    assert expected == format_for(name)


def test_an_unknown_extension_has_no_format() -> None:
    """A .txt or .json file needs --format."""
    assert [None, None] == [format_for("cards.txt"), format_for("cards.json")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_writes_a_count_line_every_10000() -> None:
    """Off a terminal: one plain line per 10,000 items crossed, no carriage returns."""
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, total=25_000, interactive=False, clock=clock)
    for _ in range(50):
        clock.now += 0.1
        progress.advance(500)
    progress.close()
    assert [
        "10,000 cards so far (5,000/s)",
        "20,000 cards so far (5,000/s)",
    ] == stream.getvalue().splitlines()


def test_terminal_progress_redraws_one_line_at_most_ten_times_a_second() -> None:
    """On a terminal: a bar redrawn with a carriage return, throttled, then ended with a newline."""
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, total=10_000, interactive=True, clock=clock)
    for _ in range(100):
        clock.now += 0.01
        progress.advance(50)
    progress.close()
    frames = stream.getvalue().split("\r\x1b[K")[1:]
    assert 10 <= len(frames) <= 12
    assert "[#####.....]  5,000/10,000 cards  5,000/s" == frames[-1].rstrip("\n")
    assert stream.getvalue().endswith("\n")


def test_a_message_clears_the_bar_and_the_next_advance_redraws_it() -> None:
    """A line written during progress starts on a clean line; the bar returns on the next count."""
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, total=10, interactive=True, clock=clock)
    clock.now = 1.0
    progress.advance(1)
    progress.message("line 3: pan fails the Luhn check")
    progress.message("line 4: pan fails the Luhn check")
    progress.advance(1)
    assert (
        "\r\x1b[K[#.........]  1/10 cards  1/s"
        "\r\x1b[Kline 3: pan fails the Luhn check\nline 4: pan fails the Luhn check\n"
        "\r\x1b[K[##........]  2/10 cards  2/s"
    ) == stream.getvalue()
