"""`relay flexsim serve` as a process: signals, bad arguments, and HTTPS with a test CA."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from relay.dev import tlsgen
from relay.errors import FlexUnavailable
from tests.cards_testdata import TEST_CARDS
from tests.integration.conftest import (
    MakeRig,
    StartFlexSim,
    make_card,
    serve_command,
    token_claims,
)

VISA = TEST_CARDS[0].digits
BAD_ARGUMENT_TIMEOUT = 5.0


async def test_sigterm_lets_an_in_flight_request_finish_then_exits_0(
    flexsim_factory: StartFlexSim,
) -> None:
    """SIGTERM during a slow request: the request still gets its answer and the exit code is 0."""
    sim = flexsim_factory("--fault-latency-ms", "500")
    async with httpx.AsyncClient(timeout=10.0) as http:
        started = time.monotonic()
        request = asyncio.create_task(http.get(f"{sim.url}/flex/v2/public-keys/{sim.kid}"))
        await asyncio.sleep(0.2)
        in_flight = not request.done()
        sim.process.send_signal(signal.SIGTERM)
        response = await request
        elapsed = time.monotonic() - started
    returncode = await asyncio.to_thread(sim.stop)
    assert (True, 200, sim.kid, 0) == (
        in_flight,
        response.status_code,
        response.json()["kid"],
        returncode,
    )
    assert elapsed >= 0.5
    assert 1 == len(sim.events("flexsim_stopped"))


def test_sigint_exits_0(flexsim_factory: StartFlexSim) -> None:
    """SIGINT stops the simulator cleanly, with exit code 0 and a flexsim_stopped line."""
    sim = flexsim_factory()
    assert (0, 1) == (sim.stop(signal.SIGINT), len(sim.events("flexsim_stopped")))
    assert "Traceback" not in sim.output


CONFIG_ERRORS = {
    "secret_not_base64": ("--shared-secret", "not-base64!"),
    "negative_error_rate": ("--fault-error-rate", "-0.5"),
    "throttle_rate_over_1": ("--fault-throttle-rate", "1.5"),
    "unknown_fault_path": ("--fault-paths", "sessions,payments"),
    "negative_hold": ("--fault-hold-after-issue-ms", "-1"),
    "hold_without_tokens_path": ("--fault-hold-after-issue-ms", "100", "--fault-paths", "sessions"),
    "tls_cert_without_key": ("--tls-cert", "cert.pem"),
    "tls_files_missing": (
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ),
}
"""Arguments that parse but make no sense: one `relay: ...` line."""

PARSE_ERRORS = {
    "port_out_of_range": ("--port", "70000"),
    "port_not_a_number": ("--port", "https"),
    "context_ttl_zero": ("--context-ttl", "0"),
    "pool_size_zero": ("--pool-size", "0"),
}
"""Arguments argparse refuses itself: its usage text, then one `error:` line."""


def run_bad(*args: str) -> subprocess.CompletedProcess[str] | None:
    """Run `relay flexsim serve` expecting it to exit; None if it was still running."""
    command = serve_command()
    # A later --shared-secret or --port overrides the default one given by serve_command.
    if args[0] == "--shared-secret":
        command[command.index("--shared-secret") + 1] = args[1]
        args = args[2:]
    with subprocess.Popen(
        [*command, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=BAD_ARGUMENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=10)
            return None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("args", list(CONFIG_ERRORS.values()), ids=list(CONFIG_ERRORS))
def test_bad_argument_exits_2_with_one_line(args: tuple[str, ...]) -> None:
    """A bad argument exits 2 with one `relay: ...` line and no traceback."""
    result = run_bad(*args)
    assert result is not None, "the simulator started instead of refusing the argument"
    lines = result.stderr.splitlines()
    assert (2, 1, True, "") == (
        result.returncode,
        len(lines),
        bool(lines) and lines[0].startswith("relay: invalid configuration: "),
        result.stdout,
    ), result.stderr[-2000:]


@pytest.mark.parametrize("args", list(PARSE_ERRORS.values()), ids=list(PARSE_ERRORS))
def test_unparsable_argument_exits_2_with_usage(args: tuple[str, ...]) -> None:
    """An argument argparse refuses exits 2 with usage and one error line naming it."""
    result = run_bad(*args)
    assert result is not None, "the simulator started instead of refusing the argument"
    lines = result.stderr.splitlines()
    assert (2, True, True, False) == (
        result.returncode,
        lines[0].startswith("usage: relay flexsim serve"),
        lines[-1].startswith(f"relay flexsim serve: error: argument {args[0]}: "),
        "Traceback" in result.stderr,
    ), result.stderr[-2000:]


def test_occupied_port_exits_2_with_one_line(occupied_port: int) -> None:
    """A port another process listens on exits 2 with one `relay: ...` line naming it."""
    result = run_bad("--port", str(occupied_port))
    assert result is not None
    lines = result.stderr.splitlines()
    assert (2, 1, True) == (
        result.returncode,
        len(lines),
        lines[0].startswith(
            f"relay: invalid configuration: cannot listen on 127.0.0.1:{occupied_port}"
        ),
    ), result.stderr[-2000:]


# HTTPS with a throwaway CA.


def write_test_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed; returns (ca, cert, key) paths."""
    ca = tlsgen.new_ca("flexsim integration CA")
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.cert_pem)
    cert, key = tlsgen.issue_server(ca, ("127.0.0.1",)).write(directory, "server")
    return ca_path, cert, key


async def test_https_flow_with_the_test_ca_trusted_through_ca_file(
    flexsim_factory: StartFlexSim, make_rig: MakeRig, tmp_path: Path
) -> None:
    """Over HTTPS a client trusting the test CA via ca_file runs the flow; one without fails."""
    ca, cert, key = write_test_pki(tmp_path)
    sim = flexsim_factory("--tls-cert", str(cert), "--tls-key", str(key))
    untrusting = make_rig(config=sim.config())
    with pytest.raises(FlexUnavailable):
        await untrusting.flex.create_session()
    rig = make_rig(config=sim.config(ca_file=str(ca)))
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    token = rig.flex.verify_transient_token(
        await rig.flex.post_token(ctx, rig.flex.encrypt_card(ctx, make_card(VISA))), ctx
    )
    assert (True, sim.url, "XXXXXXXXXXXX1111") == (
        sim.url.startswith("https://127.0.0.1:"),
        token_claims(ctx.raw)["flx"]["origin"],
        token.masked_pan,
    )
    assert 3 == len(untrusting.sent)
