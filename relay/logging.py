"""Logging for the relay: one structlog pipeline writing JSON lines, with card data scrubbed.

The order of the processors is the point of this module:

1. ``format_exc_info`` renders an exception as plain traceback text *without local variables*.
   structlog's ``dict_tracebacks`` (and ``ConsoleRenderer``) show every frame's locals by
   default, so a local ``digits = "4111..."`` anywhere on the stack would reach the log line
   (STYLE leak 4).
2. ``scrub_card_data`` runs *after* the exception is rendered, so the traceback text is scrubbed
   too: stdlib messages echo their input (``int("4111 1111 ...")`` raises a ValueError that
   quotes the digits), so a traceback can carry a PAN when no variable was logged (STYLE leak 5).
3. ``JSONRenderer`` runs last and only ever sees values the scrubber has already turned into
   masked text or JSON-native values.

stdlib logging, where grpc reports servicer crashes (logger ``grpc._cython.cygrpc``, STYLE leak 6)
and uvicorn reports errors (``uvicorn.error``), goes through ``ProcessorFormatter`` with the same
chain, so those lines are JSON and scrubbed too. uvicorn must be started with ``log_config=None``
so that it keeps no handlers of its own; its per-request access log is kept from WARNING up only.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from relay.cards import CardData, Pan, SecurityCode, luhn_ok
from relay.secrets import Secret

__all__ = [
    "REDACTED",
    "configure_logging",
    "scrub_card_data",
    "scrub_text",
]

REDACTED: Final = "[REDACTED]"
"""What the value of a key naming a card number or security code is replaced with."""

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Any text with a PAN or a security code has three digits in a row; text without them (most
# event names and ids) costs one C-speed search and nothing else.
_PREFILTER: Final = re.compile(r"[0-9]{3}")

# A run of 13 or more ASCII digits where neighbouring digits may be separated by one space or
# one dash: "4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111".
_DIGIT_RUN: Final = re.compile(r"[0-9](?:[ -]?[0-9]){12,}")

# A security code named in free text: JSON (also JSON escaped inside JSON), protobuf text
# format, key=value. Only the 3 or 4 digits are replaced.
_SECURITY_CODE_TEXT: Final = re.compile(
    r"(?i)(\b(?:cvv2?|cvc2?|cvn|cid|(?:card_?)?security_?code)\b[\\\"']{0,3}\s*[:=]\s*[\\\"']{0,3})"
    r"[0-9]{3,4}\b"
)

_PAN_LENGTHS: Final = range(13, 20)
_CLEAR_HEAD: Final = 6
_CLEAR_TAIL: Final = 4

# Past this many digits a run is not scanned window by window (about 7 Luhn checks per digit);
# everything but its first 6 and last 4 digits is masked, which hides any PAN inside it.
_LONG_RUN: Final = 64

# Key names (lowercased, "_" and "-" removed, last dotted segment) whose values are card data.
_CARD_NUMBER_KEYS: Final = frozenset(
    {"pan", "number", "cardnumber", "accountnumber", "primaryaccountnumber"}
)
_SECURITY_CODE_KEYS: Final = frozenset(
    {"cvv", "cvv2", "cvc", "cvc2", "cvn", "cid", "securitycode", "cardsecuritycode"}
)

# Values of these types render masked by construction; they are logged as their repr.
_MASKED_TYPES: Final = (Pan, SecurityCode, Secret, CardData)

_WRITE_LOCK: Final = threading.Lock()


def scrub_text(text: str) -> str:
    """Mask every PAN-like digit run in text and redact security codes named in it.

    A run of 13 or more digits (single spaces or dashes allowed between them) is scanned for
    every window of 13 to 19 digits; each window that passes Luhn keeps its first 6 and last 4
    digits and has the digits between replaced with "X". Scanning windows, not whole runs,
    catches a PAN glued to other digits (a 25-digit id that contains one). The price is that a
    long number that is not a card (a nanosecond timestamp, a 13-digit millisecond one in 1 case
    out of 10) may be partly masked; shorter numbers (ports, 10-digit timestamps, 12-digit ids)
    never are. Only ASCII digits are considered: Pan accepts nothing else.
    """
    if _PREFILTER.search(text) is None:
        return text
    text = _DIGIT_RUN.sub(_mask_run, text)
    return _SECURITY_CODE_TEXT.sub(rf"\g<1>{REDACTED}", text)


def _mask_run(match: re.Match[str]) -> str:
    run = match.group()
    positions = [index for index, char in enumerate(run) if char not in " -"]
    hidden = _hidden_digits("".join(run[index] for index in positions))
    if not hidden:
        return run
    chars = list(run)
    for digit_index in hidden:
        chars[positions[digit_index]] = "X"
    return "".join(chars)


def _hidden_digits(digits: str) -> set[int]:
    """Indexes of the digits to mask: the middle of every Luhn-valid window of 13 to 19."""
    if len(digits) > _LONG_RUN:
        return set(range(_CLEAR_HEAD, len(digits) - _CLEAR_TAIL))
    hidden: set[int] = set()
    for length in _PAN_LENGTHS:
        for start in range(len(digits) - length + 1):
            if luhn_ok(digits[start : start + length]):
                hidden.update(range(start + _CLEAR_HEAD, start + length - _CLEAR_TAIL))
    return hidden


def scrub_card_data(
    logger: WrappedLogger,  # noqa: ARG001  structlog's processor signature
    method_name: str,  # noqa: ARG001  as above
    event_dict: EventDict,
) -> EventDict:
    """Mask card data anywhere in the event dict, keys included: a structlog processor.

    Strings (at any depth of dicts, lists and tuples) go through scrub_text. The value of a key
    naming a card number or a security code (``pan``, ``number``, ``cardNumber``, ``cvv``,
    ``securityCode``, ``paymentInformation.card.number``, ... in any case) becomes "[REDACTED]",
    whatever it is, unless it is None or one of the masked types. Pan, SecurityCode, Secret and
    CardData are rendered as their (masked) repr; any other non-JSON value as its repr, scrubbed,
    which is what JSONRenderer would print for it anyway. Numbers are kept unless their digits
    form a PAN, in which case they become the masked text.
    """
    return {scrub_text(key): _scrub_field(key, value) for key, value in event_dict.items()}


def _scrub_mapping(mapping: dict[Any, Any]) -> dict[object, object]:
    return {_scrub_key(key): _scrub_field(key, value) for key, value in mapping.items()}


def _scrub_key(key: object) -> object:
    return key if isinstance(key, bool) or not isinstance(key, str | int) else _scrub_value(key)


def _scrub_field(key: object, value: object) -> object:
    if isinstance(key, str) and _names_card_data(key):
        return value if value is None else _masked_repr(value)
    return _scrub_value(value)


def _names_card_data(key: str) -> bool:
    name = key.rsplit(".", 1)[-1].replace("_", "").replace("-", "").lower()
    return name in _CARD_NUMBER_KEYS or name in _SECURITY_CODE_KEYS


def _masked_repr(value: object) -> str:
    return repr(value) if isinstance(value, _MASKED_TYPES) else REDACTED


def _scrub_value(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return _scrub_number(value)
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return _scrub_mapping(value)
    if isinstance(value, list | tuple):
        items = [_scrub_value(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return repr(value) if isinstance(value, _MASKED_TYPES) else scrub_text(_render(value))


def _scrub_number(value: float | None) -> object:
    """Keep a number unless its digits, as JSON would print them, form a PAN."""
    if value is None or isinstance(value, bool):
        return value
    text = repr(float(value)) if isinstance(value, float) else str(int(value))
    scrubbed = scrub_text(text)
    return value if scrubbed == text else scrubbed


def _render(value: object) -> str:
    to_structlog = getattr(value, "__structlog__", None)
    return str(to_structlog()) if callable(to_structlog) else repr(value)


# Shared by structlog events and foreign (stdlib) records, in this order (module docstring).
_PRE_CHAIN: Final[tuple[Processor, ...]] = (
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
)
_RENDER_CHAIN: Final[tuple[Processor, ...]] = (
    structlog.processors.format_exc_info,
    scrub_card_data,
    structlog.processors.JSONRenderer(),
)


def configure_logging(*, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging for the process: scrubbed JSON lines.

    Lines go to ``stream``, or to whatever ``sys.stderr`` is when each line is written (so
    pytest's capture and ``contextlib.redirect_stderr`` see them). Calling it again replaces
    the previous configuration; it never adds a second handler.
    """
    number = _LEVELS.get(level.lower())
    if number is None:
        raise ValueError(f"unknown log level {level!r}, expected one of {sorted(_LEVELS)}")
    structlog.configure(
        processors=[*_PRE_CHAIN, *_RENDER_CHAIN],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=_LineWriterFactory(stream),
        # Not cached, so that a logger bound at import time follows a later reconfiguration.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(number, stream)


def _route_stdlib_logging(level: int, stream: TextIO | None) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _JSONLineHandler)]:
        root.removeHandler(handler)
    handler = _JSONLineHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_PRE_CHAIN, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_RENDER_CHAIN],
        )
    )
    root.addHandler(handler)
    root.setLevel(level)
    # One line per HTTP request says little that the simulator's own events do not.
    logging.getLogger("uvicorn.access").setLevel(max(level, logging.WARNING))


def _write_line(stream: TextIO | None, line: str) -> None:
    target = sys.stderr if stream is None else stream
    with _WRITE_LOCK:
        target.write(line + "\n")
        target.flush()


class _LineWriter:
    """The structlog logger: writes each rendered line whatever the level method called."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        _write_line(self._stream, message)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = msg


class _LineWriterFactory:
    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def __call__(self, *_args: object) -> _LineWriter:
        return _LineWriter(self._stream)


class _JSONLineHandler(logging.Handler):
    """The stdlib handler: one scrubbed JSON line per record."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        # logging.Handler.handleError would print record.msg and record.args unscrubbed.
        except Exception:  # noqa: BLE001  a log call must not raise, nor leak through the fallback
            line = json.dumps({"event": "log_record_unformattable", "logger": record.name})
        _write_line(self._stream, line)
