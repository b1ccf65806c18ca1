"""The `relay` command, run as a process: help, usage errors, and one-line configuration errors."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

SECRET = base64.b64encode(b"cli-test-shared-secret").decode("ascii")
SERVE = (
    "flexsim",
    "serve",
    "--port",
    "0",
    "--pool-size",
    "1",
    "--merchant-id",
    "testrest",
    "--key-id",
    "cli-key",
)


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `relay ARGS` in a fresh interpreter; a hang fails the test instead of blocking it."""
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def relay_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("relay: ")]


def test_help_lists_flexsim():
    """`relay --help` exits 0 and lists the flexsim command from the entry-point group."""
    result = relay("--help")
    assert 0 == result.returncode
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert ["flexsim"] == [command for command in listed if command == "flexsim"]
    assert "the embedded Flex API v2 simulator" in result.stdout


def test_no_command_is_a_usage_error():
    """`relay` alone exits 2 with argparse's usage message."""
    result = relay()
    assert 2 == result.returncode
    assert result.stderr.startswith("usage: relay")


def test_serve_without_required_arguments_is_a_usage_error():
    """`relay flexsim serve` without its required options exits 2 with a usage message."""
    result = relay("flexsim", "serve")
    assert 2 == result.returncode
    assert result.stderr.startswith("usage: relay flexsim serve")
    assert "the following arguments are required: --merchant-id, --key-id" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_secret_that_is_not_base64_is_one_line_on_stderr():
    """A malformed --shared-secret exits 2 with one `relay: ` line, no traceback, no value."""
    result = relay(*SERVE, "--shared-secret", "not base64!")
    assert 2 == result.returncode
    assert ["relay: invalid configuration: --shared-secret is not valid base64"] == relay_lines(
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "not base64!" not in result.stderr + result.stdout


def test_an_unreadable_secret_file_is_one_line_on_stderr(tmp_path: Path):
    """An unreadable --shared-secret-file exits 2 with one `relay: ` line naming the option."""
    result = relay(*SERVE, "--shared-secret-file", str(tmp_path / "absent"))
    assert 2 == result.returncode
    assert ["relay: invalid configuration: --shared-secret-file cannot be read"] == relay_lines(
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_tls_cert_without_key_is_one_line_on_stderr(tmp_path: Path):
    """--tls-cert without --tls-key exits 2 with one `relay: ` line, before serving anything."""
    result = relay(*SERVE, "--shared-secret", SECRET, "--tls-cert", str(tmp_path / "cert.pem"))
    assert 2 == result.returncode
    assert ["relay: invalid configuration: --tls-cert and --tls-key go together"] == relay_lines(
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_tls_key_without_cert_is_one_line_on_stderr(tmp_path: Path):
    """--tls-key without --tls-cert is refused the same way."""
    result = relay(*SERVE, "--shared-secret", SECRET, "--tls-key", str(tmp_path / "key.pem"))
    assert 2 == result.returncode
    assert ["relay: invalid configuration: --tls-cert and --tls-key go together"] == relay_lines(
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_several_bad_fault_options_are_one_line():
    """Bad fault options are collected into one `relay: ` line listing each problem."""
    result = relay(
        *SERVE,
        "--shared-secret",
        SECRET,
        "--fault-error-rate",
        "2",
        "--fault-paths",
        "sessions,everything",
    )
    assert 2 == result.returncode
    expected = (
        "relay: invalid configuration: --fault-error-rate must be between 0 and 1; "
        "--fault-paths takes sessions, tokens and public-keys"
    )
    assert [expected] == relay_lines(result.stderr)
    assert "Traceback" not in result.stderr


def test_a_port_out_of_range_is_a_usage_error():
    """--port 70000 exits 2 with argparse's usage error naming --port, not a traceback."""
    result = relay(*SERVE[:2], "--port", "70000", *SERVE[4:], "--shared-secret", SECRET)
    assert 2 == result.returncode
    assert "argument --port: a port is a whole number from 0 to 65535" in result.stderr
    assert "Traceback" not in result.stderr
