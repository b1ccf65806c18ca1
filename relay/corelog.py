"""gRPC C-core's own log lines, turned into our JSON events (scrubbed like every other line).

C-core writes straight to file descriptor 2 ("Handshake failed with error SSL_ERROR_SSL: ...
CERTIFICATE_VERIFY_FAILED"), past Python and so past structlog and its card-data scrubber.
While `core_log_captured()` is open, fd 2 is a pipe that a daemon thread reads line by line:

- a TLS handshake failure becomes `tls_handshake_refused` (warning) with the library's text in
  `detail` and the peer address in `peer_address` when the line names one;
- any other line becomes `grpc_core_log` with its severity (I, W, E, F of the absl prefix).

Our own output is not in that pipe: `sys.stderr` is pointed at a duplicate of the original
descriptor for as long as the capture lasts, so structlog lines (written to whatever
`sys.stderr` is when a line is written, see relay.logging) and the CLI's own messages reach the
real stderr as before. GRPC_VERBOSITY defaults to ERROR (the operator's value is kept); C-core
reads it when it first starts, so the capture opens before any server or channel exists.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import Final

import structlog

__all__ = ["core_log_captured", "log_core_line"]

_ABSL_LINE: Final = re.compile(r"^([IWEF])\d{4} [0-9:.]+\s+\d+\s+([^\]\s]+)\] ?(.*)$")
_SEVERITIES: Final = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_HANDSHAKE: Final = re.compile(r"(?i)handshake failed")
_PEER_ADDRESS: Final = re.compile(r"\b(?:ipv4|ipv6):[^\s,;]+")
_JOIN_SECONDS: Final = 2.0
"""How long a closing capture waits for the reader to log what is still in the pipe."""

_log = structlog.get_logger("grpc.core")


@contextlib.contextmanager
def core_log_captured() -> Iterator[None]:
    """Route fd 2 through the JSON pipeline until exit; sys.stderr keeps the real stderr."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.stderr.flush()
    original_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    original_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(
        io.FileIO(original_fd, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    reader = threading.Thread(target=_read, args=(read_fd,), name="grpc-core-log", daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        # fd 2 first: the pipe's last write end goes, so the reader logs what is left, sees EOF
        # and ends; only then does sys.stderr go back (a line written between the two would
        # otherwise come back through the pipe, wrapped twice).
        os.dup2(original_fd, 2)
        sys.stderr = original_stderr
        os.close(original_fd)
        reader.join(_JOIN_SECONDS)


def _read(read_fd: int) -> None:
    """Drain the pipe to its end, whatever a line does to the logger.

    If the reader stopped, C-core's next writes to fd 2 would fill the pipe and block the
    process; a line that cannot be logged is dropped (and counted in the next one's place).
    """
    dropped = 0
    with open(read_fd, "rb") as pipe:
        for raw in pipe:
            try:
                log_core_line(raw.decode("utf-8", "replace"))
                if dropped:
                    _log.error("grpc_core_log_dropped", lines=dropped)
                    dropped = 0
            except Exception:  # noqa: BLE001  the reader must outlive any one line
                dropped += 1


def log_core_line(line: str) -> None:
    """Log one line C-core wrote as a JSON event (the scrubber sees all of its text)."""
    line = line.strip()
    if not line:
        return
    match = _ABSL_LINE.match(line)
    severity, source, text = match.groups() if match else ("", "", line)
    if _HANDSHAKE.search(text):
        address = _PEER_ADDRESS.search(text)
        peer = {"peer_address": address.group(0)} if address else {}
        _log.warning("tls_handshake_refused", detail=text, source=source, **peer)
        return
    level = _SEVERITIES.get(severity, "warning")
    getattr(_log, level)("grpc_core_log", severity=level if severity else "unknown", detail=text)
