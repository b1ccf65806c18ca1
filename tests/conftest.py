"""Suite-wide setup: production logging, and a scan of every test's output for the test PANs.

DESIGN "Security invariants": no PAN appears in any log line or exception text, in any test.
The autouse fixture below reads what each test wrote (stdout and stderr at the file-descriptor
level, so structlog lines, subprocesses that inherit them and grpc's C core are included) and
every stdlib log record, raw, before any scrubbing; one full test PAN fails the test. Output a
test reads itself with readouterr() is scanned too, and so is the ``log_stream`` fixture's text.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Literal

import pytest

from relay.logging import configure_logging
from tests.cards_testdata import find_test_pans

# tests.vault_backends: one throwaway PostgreSQL database for the whole run, shared by every
# directory that uses the vault or ledger fixtures.
pytest_plugins = ["pytester", "tests.vault_backends"]

# At most one capture fixture may be active per test: use the test's own if it asked for one.
_CAPTURE_FIXTURES = ("capsys", "capteesys", "capsysbinary", "capfdbinary", "capfd")
_PHASES: tuple[Literal["setup", "call", "teardown"], ...] = ("setup", "call", "teardown")


def pytest_configure(config: pytest.Config) -> None:
    """Log as production does (JSON, scrubbed), to whatever sys.stderr is when a line is written."""
    configure_logging(level="debug")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Send the production logging pipeline to a StringIO for one test, then back to stderr."""
    stream = io.StringIO()
    configure_logging(level="debug", stream=stream)
    yield stream
    configure_logging(level="debug")


@pytest.fixture(autouse=True)
def _no_test_pan_leaks(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail the test if a test PAN appears in full in its output or in its log records."""
    name = next((n for n in _CAPTURE_FIXTURES if n in request.fixturenames), "capfd")
    capture: pytest.CaptureFixture[str] | pytest.CaptureFixture[bytes]
    capture = request.getfixturevalue(name)
    texts: list[tuple[str, str]] = []
    log_stream: io.StringIO | None = None
    if "log_stream" in request.fixturenames:
        log_stream = request.getfixturevalue("log_stream")
    _keep_what_the_test_reads(capture, texts)
    yield
    # Through the wrapper installed above, so this last read is recorded in texts too.
    out, err = (_as_text(part) for part in capture.readouterr())
    if name != "capteesys":  # capteesys has already passed it through
        # Written back so that pytest still shows the output of a failing test.
        sys.stdout.write(out)
        sys.stderr.write(err)
    texts.extend(_log_texts(caplog))
    if log_stream is not None:
        texts.append(("log_stream", log_stream.getvalue()))
    leaks = [
        f"{where}: {', '.join(found)}" for where, text in texts if (found := find_test_pans(text))
    ]
    if leaks:
        pytest.fail("test PAN leaked in " + "; ".join(leaks), pytrace=False)


def _keep_what_the_test_reads(
    capture: pytest.CaptureFixture[str] | pytest.CaptureFixture[bytes],
    texts: list[tuple[str, str]],
) -> None:
    """Record the output a test reads itself, since readouterr() hands it over only once."""
    read: Callable[[], tuple[str | bytes, str | bytes]] = capture.readouterr

    def readouterr() -> tuple[str | bytes, str | bytes]:
        result = read()
        texts.extend([("stdout", _as_text(result[0])), ("stderr", _as_text(result[1]))])
        return result

    capture.readouterr = readouterr  # type: ignore[method-assign,assignment]


def _as_text(data: str | bytes) -> str:
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _log_texts(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[str, str]]:
    for phase in _PHASES:
        for record in caplog.get_records(phase):
            yield f"log record of {record.name}", _record_text(record)


def _record_text(record: logging.LogRecord) -> str:
    parts = [str(record.msg), record.exc_text or "", record.stack_info or ""]
    try:
        parts.append(record.getMessage())
    except (TypeError, ValueError):
        parts.append(repr(record.args))
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    # Three newlines, so that digits of neighbouring parts are never read as one number.
    return "\n\n\n".join(parts)
