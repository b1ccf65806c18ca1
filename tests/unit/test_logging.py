"""relay.logging: the card-data scrubber, and the configured pipeline for structlog and stdlib."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping

import pytest
import structlog
from structlog.testing import capture_logs

from relay import logging as relay_logging
from relay.cards import CardData, Pan, SecurityCode, luhn_ok
from relay.logging import REDACTED, configure_logging, scrub_card_data, scrub_text
from relay.secrets import Secret
from tests.cards_testdata import TEST_CARDS, TEST_PANS, find_test_pans, masked_hint

VISA = TEST_PANS[0]
VISA_SCRUBBED = "411111XXXXXX1111"
# A Luhn-valid number that is not a listed test PAN: raw stdlib records reach caplog unscrubbed,
# and the autouse leak scan would (rightly) fail any test logging a listed one that way.
UNLISTED_PAN = "4012888888881881"


def _scrub(event_dict: Mapping[str, object]) -> dict[str, object]:
    return dict(scrub_card_data(None, "info", dict(event_dict)))


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# scrub_text


@pytest.mark.parametrize("card", TEST_CARDS, ids=repr)
def test_every_test_pan_keeps_only_its_first_six_and_last_four(card):
    """Each test PAN becomes its BIN, one X per hidden digit, and its last four."""
    digits = card.digits
    expected = digits[:6] + "X" * (len(digits) - 10) + digits[-4:]
    assert expected == scrub_text(digits)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4111 1111 1111 1111", "4111 11XX XXXX 1111"),
        ("4111-1111-1111-1111", "4111-11XX-XXXX-1111"),
        ("3782 822463 10005", "3782 82XXXX X0005"),
        ("4111 1111-1111 1111", "4111 11XX-XXXX 1111"),
    ],
    ids=["spaces", "dashes", "amex_4_6_5", "mixed"],
)
def test_separated_pans_are_masked_in_place(text, expected):
    """Single spaces or dashes between digits do not hide a PAN; separators are kept."""
    assert expected == scrub_text(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"invalid literal for int() with base 10: '{VISA}x'",
            f"invalid literal for int() with base 10: '{VISA_SCRUBBED}x'",
        ),
        (
            f'{{"paymentInformation":{{"card":{{"number":"{VISA}"}}}}}}',
            f'{{"paymentInformation":{{"card":{{"number":"{VISA_SCRUBBED}"}}}}}}',
        ),
        (
            f"https://flex.example/tokens?pan={VISA}&port=8443",
            f"https://flex.example/tokens?pan={VISA_SCRUBBED}&port=8443",
        ),
        (f"card{VISA}end", f"card{VISA_SCRUBBED}end"),
    ],
    ids=["int_error", "json_text", "url", "between_letters"],
)
def test_a_pan_embedded_in_text_is_masked(text, expected):
    """A PAN inside an exception message, JSON text or a URL is masked where it stands."""
    assert expected == scrub_text(text)


def test_a_pan_inside_a_longer_digit_run_is_masked():
    """A 25-digit number containing a test PAN loses the PAN (every Luhn window is masked)."""
    scrubbed = scrub_text("123456789" + VISA)
    found = find_test_pans(scrubbed)
    assert ([], 25, "1111") == (found, len(scrubbed), scrubbed[-4:])


def test_a_very_long_digit_run_keeps_only_its_ends():
    """Past 64 digits a run keeps its first six and last four digits only."""
    scrubbed = scrub_text("1" * 40 + VISA + "2" * 40)
    assert "111111" + "X" * 86 + "2222" == scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "listening on 127.0.0.1:50051",
        "at 1718000000 epoch seconds",
        "order 123456789012",
        "123456789012 and 123456789012",
        "2026-11-23T12:04:13.531737Z",
        "123e4567-e89b-12d3-a456-426614174000",
        "f47ac10b-58cc-4372-a567-0e02b2c3d479",
        "kid 08d3Ct8WYqbgKn6KXm0zcgfR4U4TcSKd",
    ],
)
def test_short_numbers_ids_and_times_are_left_alone(text):
    """Ports, 10-digit timestamps, 12-digit ids, ISO times, UUIDs and kids are not masked."""
    assert text == scrub_text(text)


def test_digit_free_text_costs_one_search_and_comes_back_unchanged():
    """Text without three digits in a row is returned as the very same object (the prefilter)."""
    text = "card_tokenized for merchant m-42 in region eu"
    assert text is scrub_text(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"securityCode":"123"}', f'{{"securityCode":"{REDACTED}"}}'),
        ('{\\"cvv\\": \\"1234\\"}', f'{{\\"cvv\\": \\"{REDACTED}\\"}}'),
        ('security_code: "737"', f'security_code: "{REDACTED}"'),
        ("cvc2=123&x=1", f"cvc2={REDACTED}&x=1"),
        (
            "paymentInformation.card.securityCode = 999",
            f"paymentInformation.card.securityCode = {REDACTED}",
        ),
    ],
    ids=["json", "json_in_json", "protobuf_text", "query", "dotted"],
)
def test_a_security_code_named_in_text_is_redacted(text, expected):
    """A 3 or 4 digit value after a security-code name in text is redacted."""
    assert expected == scrub_text(text)


# scrub_card_data


def test_pans_are_masked_at_any_depth():
    """Strings in a dict in a list in a dict, and in tuples, are scrubbed."""
    event = {"event": "x", "outer": [{"inner": ("ok", f"pan {VISA}")}]}
    expected = {"event": "x", "outer": [{"inner": ("ok", f"pan {VISA_SCRUBBED}")}]}
    assert expected == _scrub(event)


def test_keys_are_scrubbed_too():
    """A PAN used as a key, at the top or nested, is masked."""
    event = {VISA: 1, "nested": {f"by {VISA}": 2}}
    expected = {VISA_SCRUBBED: 1, "nested": {f"by {VISA_SCRUBBED}": 2}}
    assert expected == _scrub(event)


def test_numbers_that_are_pans_become_masked_text():
    """An int or float PAN would print its digits in JSON, so it becomes the masked string."""
    event = {"as_int": int(VISA), "as_float": float(VISA), "port": 8443, "ratio": 0.5}
    expected = {
        "as_int": VISA_SCRUBBED,
        "as_float": VISA_SCRUBBED + ".0",
        "port": 8443,
        "ratio": 0.5,
    }
    assert expected == _scrub(event)


@pytest.mark.parametrize(
    "key",
    [
        "cvv",
        "CVV2",
        "cvc",
        "cvn",
        "cid",
        "security_code",
        "securityCode",
        "card_security_code",
        "paymentInformation.card.securityCode",
        "pan",
        "number",
        "card_number",
        "cardNumber",
        "paymentInformation.card.number",
    ],
)
def test_values_of_card_data_keys_are_redacted(key):
    """Whatever value a key naming a card number or security code holds, it is redacted."""
    event = {key: "123", "nested": [{key: {"any": "thing"}}]}
    expected = {key: REDACTED, "nested": [{key: REDACTED}]}
    assert expected == _scrub(event)


def test_card_data_keys_keep_none_and_masked_values():
    """None says nothing, and a Pan or SecurityCode already renders masked, so both are kept."""
    event = {"pan": Pan(VISA), "cvv": SecurityCode("123"), "security_code": None}
    expected = {"pan": "Pan(XXXXXXXXXXXX1111)", "cvv": "SecurityCode(***)", "security_code": None}
    assert expected == _scrub(event)


def test_other_keys_are_left_alone():
    """Keys that merely contain a card word (card_ref, cid_count) are not redacted."""
    event = {"card_ref": "card-1234", "number_of_cards": 3, "kid": "abc"}
    assert event == _scrub(event)


def test_masked_types_render_as_their_repr():
    """Pan, SecurityCode, Secret and CardData values become their masked repr strings."""
    card = CardData(Pan(VISA), 12, 2031, SecurityCode("123"))
    event = {"card": card, "key": Secret(b"k"), "list": [Pan(VISA)]}
    expected = {
        "card": "CardData(pan=Pan(XXXXXXXXXXXX1111), card_type=001, security_code=True)",
        "key": "Secret(**********)",
        "list": ["Pan(XXXXXXXXXXXX1111)"],
    }
    assert expected == _scrub(event)


def test_other_objects_render_as_their_scrubbed_repr():
    """Exceptions, bytes and sets are rendered as JSONRenderer would, then scrubbed."""
    event = {"error": ValueError(f"bad {VISA}"), "raw": VISA.encode(), "ids": {VISA}}
    expected = {
        "error": f"ValueError('bad {VISA_SCRUBBED}')",
        "raw": f"b'{VISA_SCRUBBED}'",
        "ids": f"{{'{VISA_SCRUBBED}'}}",
    }
    assert expected == _scrub(event)


def test_scrub_card_data_works_inside_capture_logs():
    """capture_logs(processors=[scrub_card_data]) sees the scrubbed event."""
    with capture_logs(processors=[scrub_card_data]) as logs:
        structlog.get_logger().info("card_seen", note=f"pan {VISA}", cvv="123")
    assert [
        {"event": "card_seen", "note": f"pan {VISA_SCRUBBED}", "cvv": REDACTED, "log_level": "info"}
    ] == logs


# configure_logging


def test_the_pipeline_writes_one_scrubbed_json_object_per_line(log_stream):
    """Each event is one JSON line with level and UTC ISO timestamp, and its card data masked."""
    log = structlog.get_logger()
    log.info("card_seen", note=f"pan {VISA}")
    log.warning("card_again", number=VISA)
    lines = _lines(log_stream)
    assert [
        ("card_seen", "info", f"pan {VISA_SCRUBBED}", True),
        ("card_again", "warning", REDACTED, True),
    ] == [
        (
            line["event"],
            line["level"],
            line.get("note", line.get("number")),
            str(line["timestamp"]).endswith("Z"),
        )
        for line in lines
    ]


def test_an_exception_text_echoing_a_pan_is_scrubbed(log_stream):
    """logger.exception after int("<pan>x") logs the traceback with the PAN masked (leak 5)."""
    try:
        int(VISA + "x")
    except ValueError:
        structlog.get_logger().exception("parse_failed")
    (line,) = _lines(log_stream)
    last_line = str(line["exception"]).splitlines()[-1]
    expected = f"ValueError: invalid literal for int() with base 10: '{VISA_SCRUBBED}x'"
    assert ("parse_failed", "error", expected) == (line["event"], line["level"], last_line)


def _fail_with_a_local() -> None:
    marker = "value-of-a-local-variable"  # a locals-showing renderer would print this
    raise RuntimeError("declined " + str(len(marker)))


def test_tracebacks_are_rendered_without_locals(log_stream):
    """The traceback text names the frame and the error but no local variable's value (leak 4)."""
    try:
        _fail_with_a_local()
    except RuntimeError:
        structlog.get_logger().exception("declined")
    text = log_stream.getvalue()
    assert (False, True, True) == (
        "value-of-a-local-variable" in text,
        "_fail_with_a_local" in text,
        "RuntimeError: declined 25" in text,
    )


def test_contextvars_are_merged(log_stream):
    """Ids bound with bind_contextvars appear in every line."""
    structlog.contextvars.bind_contextvars(card_ref="card-1")
    try:
        structlog.get_logger().info("card_read")
    finally:
        structlog.contextvars.clear_contextvars()
    (line,) = _lines(log_stream)
    assert "card-1" == line["card_ref"]


def test_levels_below_the_configured_one_are_dropped():
    """At level warning, info events from structlog and stdlib write nothing."""
    stream = io.StringIO()
    try:
        configure_logging(level="warning", stream=stream)
        structlog.get_logger().info("quiet")
        logging.getLogger("grpc").info("quiet")
        structlog.get_logger().warning("loud")
    finally:
        configure_logging(level="debug")
    assert ["loud"] == [line["event"] for line in _lines(stream)]


def test_an_unknown_level_is_refused():
    """configure_logging raises ValueError for a level name it does not know."""
    with pytest.raises(ValueError, match="unknown log level 'verbose'"):
        configure_logging(level="verbose")


def test_configuring_twice_keeps_one_handler(log_stream):
    """A second configure_logging replaces the stdlib handler instead of adding one."""
    configure_logging(level="debug", stream=log_stream)
    handlers = [
        h for h in logging.getLogger().handlers if isinstance(h, relay_logging._JSONLineHandler)
    ]
    logging.getLogger("uvicorn.error").error("once")
    assert (1, ["once"]) == (len(handlers), [line["event"] for line in _lines(log_stream)])


def test_a_grpc_stdlib_record_comes_out_as_scrubbed_json(log_stream):
    """grpc's stdlib logger writes JSON with logger name, and the PAN in its message masked."""
    assert luhn_ok(UNLISTED_PAN)
    logging.getLogger("grpc._cython.cygrpc").error("Unexpected error: %s", UNLISTED_PAN)
    (line,) = _lines(log_stream)
    assert ("Unexpected error: 401288XXXXXX1881", "error", "grpc._cython.cygrpc") == (
        line["event"],
        line["level"],
        line["logger"],
    )


def test_a_stdlib_traceback_is_scrubbed(log_stream):
    """A stdlib logger.exception carrying a PAN in its traceback text writes it masked (leak 6)."""
    try:
        int(UNLISTED_PAN + "x")
    except ValueError:
        logging.getLogger("grpc._cython.cygrpc").exception("Exception calling application")
    (line,) = _lines(log_stream)
    last_line = str(line["exception"]).splitlines()[-1]
    assert "ValueError: invalid literal for int() with base 10: '401288XXXXXX1881x'" == last_line


def test_uvicorn_access_lines_are_dropped_below_warning(log_stream):
    """One line per HTTP request is not kept at info; uvicorn.error is."""
    logging.getLogger("uvicorn.access").info("GET /flex/v2/tokens 201")
    logging.getLogger("uvicorn.error").info("Started server process")
    assert ["Started server process"] == [line["event"] for line in _lines(log_stream)]


def test_an_unformattable_stdlib_record_writes_a_fixed_line(log_stream):
    """A record whose arguments do not fit its message writes a fixed line, not its arguments."""
    (handler,) = [
        h for h in logging.getLogger().handlers if isinstance(h, relay_logging._JSONLineHandler)
    ]
    args = {"name": "grpc", "msg": "two %s %s", "args": (UNLISTED_PAN,), "levelno": logging.ERROR}
    handler.handle(logging.makeLogRecord(args))
    found = find_test_pans(log_stream.getvalue())
    assert ([], [{"event": "log_record_unformattable", "logger": "grpc"}]) == (
        found,
        _lines(log_stream),
    )


def test_masked_hint_is_not_a_pan():
    """The leak fixture's way of naming a PAN does not itself match the scan."""
    hint = masked_hint(VISA)
    assert ("411111...1111", []) == (hint, find_test_pans(hint))
