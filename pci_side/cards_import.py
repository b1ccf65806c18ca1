"""Reading a card import file (CSV or JSON Lines) into validated rows, one line at a time.

The file is streamed: `read_rows` is a generator over lines, so a 10 MB file is never held in
memory and a card's digits live only as long as the batch that writes them. Each row becomes a
`CardRow` (valid, ready for the vault) or a `RejectedRow` (`line N: what is wrong`). A message
never repeats the card number, the security code or the raw line: the operator has the file and
the line number, while the terminal, a CI log or a ticket may be read by anyone.

Both formats:
- line numbers are physical lines of the file, counted from 1 (for CSV the header is a line);
- blank lines and lines whose first non-blank character is `#` are skipped but still counted
  (`#` cannot start a card_ref, so a comment is never mistaken for a row);
- a card_ref named on an earlier row, valid or not, makes the later row a duplicate naming
  that line (a row that cannot even be split into fields, such as bad JSON, names none);
- a card_ref or merchant id that holds a card number is refused: ids are shown in clear
  everywhere, so swapped columns must not put a PAN into one.

CSV needs a header naming `card_ref, pan, exp_month, exp_year` and optionally `cvv, type,
merchants`, in any order. JSON Lines takes one object per line with the same keys; `merchants`
is a list or a string; `exp_month`/`exp_year` may be numbers, every other value is a string.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO, Final, Literal

from relay.cards import CardData, Pan, SecurityCode, expiry_passed, luhn_ok, parse_expiry
from relay.errors import InvalidCardData
from relay.ids import id_problem
from relay.logging import scrub_text

Format = Literal["csv", "jsonl"]

FORMATS: Final[dict[str, Format]] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""File extensions and the format each one means."""

COLUMNS: Final = ("card_ref", "pan", "exp_month", "exp_year", "cvv", "type", "merchants")
REQUIRED: Final = COLUMNS[:4]
MAX_LINE_BYTES: Final = 65_536
"""Longer lines are rejected unread, so one runaway line cannot fill memory."""

_SAFE_NAME: Final = re.compile(r"[A-Za-z_]{1,32}")
_MERCHANT_SEPARATORS: Final = re.compile(r"[;\s]+")
_PAN_SEPARATORS: Final = re.compile(r"[ -]")


@dataclasses.dataclass(frozen=True, slots=True)
class CardRow:
    """A valid row. Its CardData renders masked, so the row can be logged or compared safely."""

    line: int
    card_ref: str
    card: CardData
    merchants: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class RejectedRow:
    """An invalid row: its line number and what is wrong, never its values."""

    line: int
    problem: str

    def __str__(self) -> str:
        """`line N: problem`, the form the import command prints."""
        return f"line {self.line}: {self.problem}"


Row = CardRow | RejectedRow


class ImportFileError(ValueError):
    """The file as a whole cannot be read as a card file (no usable CSV header)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Record:
    """A row split into named raw values, not yet validated."""

    line: int
    values: Mapping[str, object]


def format_for(filename: str) -> Format | None:
    """The format a file name's extension implies, or None."""
    lowered = filename.lower()
    return next((fmt for ext, fmt in FORMATS.items() if lowered.endswith(ext)), None)


def read_lines(stream: BinaryIO, limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Yield the physical lines of a binary stream; an over-long line is cut at limit + 1 bytes.

    The rest of an over-long line is read and dropped, so line numbers stay physical and the
    parser sees a line that is too long and rejects it.
    """
    while chunk := stream.readline(limit + 1):
        yield chunk
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while (rest := stream.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass


def read_rows(lines: Iterable[str | bytes], fmt: Format, *, today: dt.date) -> Iterator[Row]:
    """Validate a card file line by line, lazily; one Row per data line, in file order.

    Raises ImportFileError (before yielding anything) if a CSV file has no usable header.
    """
    records = _csv_records(lines) if fmt == "csv" else _jsonl_records(lines)
    first_line_of: dict[str, int] = {}
    for record in records:
        yield record if isinstance(record, RejectedRow) else _validate(record, first_line_of, today)


def _content_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, str] | RejectedRow]:
    """Number lines from 1, decode them, drop blanks and comments, reject unreadable lines."""
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            yield RejectedRow(number, f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        text = _decode(raw)
        if text is None:
            yield RejectedRow(number, "not valid UTF-8")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        text = text.rstrip("\r\n")
        if text.strip() and not text.lstrip().startswith("#"):
            yield number, text


def _decode(raw: str | bytes) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _csv_records(lines: Iterable[str | bytes]) -> Iterator[_Record | RejectedRow]:
    header: tuple[str, ...] | None = None
    for item in _content_lines(lines):
        if isinstance(item, RejectedRow):
            if header is None:
                raise ImportFileError(f"{item}: the header row cannot be read")
            yield item
            continue
        number, text = item
        fields = _split_csv(text)
        if header is None:
            header = _csv_header(number, fields)
        elif fields is None:
            yield RejectedRow(number, "malformed CSV quoting")
        elif len(fields) != len(header):
            yield RejectedRow(number, f"expected {len(header)} fields, found {len(fields)}")
        else:
            yield _Record(number, dict(zip(header, fields, strict=True)))
    if header is None:
        raise ImportFileError("no header row (card_ref,pan,exp_month,exp_year,...)")


def _split_csv(text: str) -> list[str] | None:
    # One physical line at a time: a quoted field spanning lines is malformed here by design,
    # which keeps line numbers exact.
    try:
        return [field.strip() for field in next(csv.reader((text,), strict=True))]
    except csv.Error:
        return None


def _csv_header(number: int, fields: list[str] | None) -> tuple[str, ...]:
    names = tuple(field.lower() for field in fields or ())
    unknown = [name for name in names if name not in COLUMNS]
    missing = [name for name in REQUIRED if name not in names]
    problems = []
    if unknown:
        problems.append(f"unknown columns {_names(unknown)}")
    if missing:
        problems.append(f"missing columns {', '.join(missing)}")
    if len(set(names)) != len(names):
        problems.append("a column is named twice")
    if problems:
        raise ImportFileError(f"line {number}: bad header row: {'; '.join(problems)}")
    return names


def _names(names: Sequence[str]) -> str:
    """Names for a message: only those that cannot be card data (letters and underscores)."""
    shown = [name for name in names if _SAFE_NAME.fullmatch(name)]
    if not shown:
        return "(not shown)"
    return ", ".join(shown) + ("" if len(shown) == len(names) else " (and some not shown)")


def _jsonl_records(lines: Iterable[str | bytes]) -> Iterator[_Record | RejectedRow]:
    for item in _content_lines(lines):
        if isinstance(item, RejectedRow):
            yield item
            continue
        number, text = item
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            # The decoder's message is not repeated: it can quote part of the line.
            yield RejectedRow(number, "not valid JSON")
            continue
        if not isinstance(value, dict):
            yield RejectedRow(number, "not a JSON object")
        elif unknown := [key for key in value if key not in COLUMNS]:
            yield RejectedRow(number, f"unknown keys {_names(unknown)}")
        else:
            yield _Record(number, value)


def _validate(record: _Record, first_line_of: dict[str, int], today: dt.date) -> Row:
    values = record.values
    problems: list[str] = [f"missing {key}" for key in REQUIRED if _blank(values.get(key))]
    card_ref = _card_ref(values.get("card_ref"), problems)
    if card_ref is not None:
        first = first_line_of.setdefault(card_ref, record.line)
        if first != record.line:
            problems.append(f"duplicate card_ref {card_ref} (first on line {first})")
    card = _card(values, problems, today)
    merchants = _merchants(values.get("merchants"), problems)
    if problems or card is None or card_ref is None:
        return RejectedRow(record.line, scrub_text("; ".join(problems)))
    return CardRow(record.line, card_ref, card, merchants)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _card_ref(value: object, problems: list[str]) -> str | None:
    if _blank(value):
        return None
    problem = id_problem("card_ref", value)
    if problem is not None:
        problems.append(problem)
        return None
    assert isinstance(value, str)
    return value


def _card(values: Mapping[str, object], problems: list[str], today: dt.date) -> CardData | None:
    pan = _pan(values.get("pan"), problems)
    expiry = _expiry(values.get("exp_month"), values.get("exp_year"), problems, today)
    code = _security_code(values.get("cvv"), problems)
    card_type = _card_type(values.get("type"), problems)
    if pan is None or expiry is None or problems:
        return None
    return CardData(pan, *expiry, security_code=code, card_type=card_type)


def _pan(value: object, problems: list[str]) -> Pan | None:
    if _blank(value):
        return None
    if not isinstance(value, str):
        problems.append("pan must be a string")
        return None
    digits = _PAN_SEPARATORS.sub("", value.strip())
    if not (digits.isascii() and digits.isdigit()):
        problems.append("pan must be digits (spaces and dashes allowed)")
    elif not 13 <= len(digits) <= 19:
        problems.append(f"pan must be 13 to 19 digits, found {len(digits)}")
    elif not luhn_ok(digits):
        problems.append("pan fails the Luhn check")
    else:
        return Pan(digits)
    return None


def _expiry(
    month: object, year: object, problems: list[str], today: dt.date
) -> tuple[int, int] | None:
    if _blank(month) or _blank(year):
        return None
    if not (_number_like(month) and _number_like(year)):
        problems.append("exp_month and exp_year must be numbers")
        return None
    try:
        parsed = parse_expiry(str(month), str(year))
    except InvalidCardData as exc:
        problems.append(exc.message)
        return None
    if expiry_passed(*parsed, today):
        problems.append(f"card expired {parsed[0]:02d}/{parsed[1]}")
        return None
    return parsed


def _number_like(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _security_code(value: object, problems: list[str]) -> SecurityCode | None:
    if _blank(value):
        return None
    text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit() and len(text) in (3, 4)):
        problems.append("cvv must be a string of 3 or 4 digits")
        return None
    return SecurityCode(text)


def _card_type(value: object, problems: list[str]) -> str | None:
    if _blank(value):
        return None
    text = value.strip() if isinstance(value, str) else ""
    if not (text.isascii() and text.isdigit() and len(text) == 3):
        problems.append("type must be a three-digit Cybersource card type code")
        return None
    return text


def _merchants(value: object, problems: list[str]) -> tuple[str, ...]:
    if _blank(value):
        return ()
    if isinstance(value, str):
        items: list[object] = [item for item in _MERCHANT_SEPARATORS.split(value) if item]
    elif isinstance(value, list):
        items = value
    else:
        problems.append("merchants must be a list or a string")
        return ()
    bad = _merchant_problems(items)
    if bad:
        problems.extend(bad)
        return ()
    return tuple(dict.fromkeys(str(item) for item in items))


def _merchant_problems(items: list[object]) -> list[str]:
    """One problem per distinct id problem, naming the entries (1-based) that have it."""
    entries: dict[str, list[str]] = {}
    for number, item in enumerate(items, 1):
        problem = id_problem("merchant_id", item)
        if problem is not None:
            entries.setdefault(problem, []).append(str(number))
    return [
        f"merchants: {'entry' if len(found) == 1 else 'entries'} {', '.join(found)}: {problem}"
        for problem, found in entries.items()
    ]
