"""relay.corelog on this process's own fd 2: C-core lines become scrubbed JSON, ours pass as is."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from relay.corelog import core_log_captured

HANDSHAKE = (
    b"I1202 15:42:30.363830   17108 ssl_transport_security.cc:2563] Handshake failed with error"
    b" SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED"
    b" peer ipv4:127.0.0.1:5555\n"
)
OTHER = b"E1202 15:42:31.000000   17108 chttp2_transport.cc:1403] frame 4111 1111 1111 1111\n"


def json_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects among the lines of text, and the lines that are not JSON."""
    found, other = [], []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            other.append(line)
    return found, other


def test_core_lines_become_events_and_our_own_stderr_is_untouched(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Bytes written to fd 2 come out as JSON events; sys.stderr text still reaches stderr."""
    with core_log_captured():
        os.write(2, HANDSHAKE)
        os.write(2, OTHER)
        print("relay: the CLI's own message", file=sys.stderr)
    found, other = json_lines(capfd.readouterr().err)
    handshake = next(e for e in found if e["event"] == "tls_handshake_refused")
    core = next(e for e in found if e["event"] == "grpc_core_log")
    assert ["relay: the CLI's own message"] == other
    assert ("warning", "ipv4:127.0.0.1:5555", "ssl_transport_security.cc:2563") == (
        handshake["level"],
        handshake["peer_address"],
        handshake["source"],
    )
    assert "CERTIFICATE_VERIFY_FAILED" in handshake["detail"]
    assert ("error", "error") == (core["level"], core["severity"])
    assert "4111 1111 1111 1111" not in core["detail"]


def test_fd_2_is_restored_when_the_capture_ends(capfd: pytest.CaptureFixture[str]) -> None:
    """After the capture, a raw write to fd 2 is stderr text again, not an event."""
    with core_log_captured():
        pass
    os.write(2, b"raw after\n")
    assert "raw after\n" == capfd.readouterr().err


def test_grpc_verbosity_defaults_to_error_and_keeps_the_operators_value() -> None:
    """Unset, GRPC_VERBOSITY becomes ERROR; set, it is left alone."""
    saved = os.environ.pop("GRPC_VERBOSITY", None)
    try:
        with core_log_captured():
            defaulted = os.environ.get("GRPC_VERBOSITY")
        os.environ["GRPC_VERBOSITY"] = "DEBUG"
        with core_log_captured():
            kept = os.environ.get("GRPC_VERBOSITY")
    finally:
        os.environ.pop("GRPC_VERBOSITY", None)
        if saved is not None:
            os.environ["GRPC_VERBOSITY"] = saved
    assert ("ERROR", "DEBUG") == (defaulted, kept)
