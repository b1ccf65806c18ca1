"""Fixtures for running the official Cybersource Python SDK against the Flex simulator.

The SDK lives in its own virtualenv, ``<repo>/.venv-sdk``, built by ``make sdk-venv`` from
``scripts/sdk_requirements.txt``; it is never imported here. The simulator runs as the
project's ``relay flexsim serve`` over HTTPS with a throwaway CA made for this run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.dev import tlsgen

REPO = Path(__file__).resolve().parents[2]
SDK_REQUIREMENTS = REPO / "scripts" / "sdk_requirements.txt"
SDK_VENV = REPO / ".venv-sdk"
SDK_STAMP = SDK_VENV / ".installed"
SDK_CLIENT = Path(__file__).resolve().parent / "sdk_client.py"

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 5.0
SDK_TIMEOUT = 120.0


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class Simulator:
    """A running ``relay flexsim serve`` and the credentials it accepts."""

    host: str
    port: int
    merchant_id: str
    key_id: str
    shared_secret: str
    ca_cert: Path
    log: Path

    @property
    def address(self) -> str:
        """HOST:PORT, the SDK's ``run_environment``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SdkResult:
    """What one ``sdk_client.py`` run printed and returned."""

    returncode: int
    outcome: dict[str, Any]
    stderr: str
    args: list[str] = field(default_factory=list)


def _pinned(requirement: str) -> str | None:
    match = re.search(
        rf"^{re.escape(requirement)}==(\S+)", SDK_REQUIREMENTS.read_text(), re.MULTILINE
    )
    return match.group(1) if match else None


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    """The SDK virtualenv's python, checked against scripts/sdk_requirements.txt."""
    python = SDK_VENV / "bin" / "python"
    fix = f"Build it with `make sdk-venv` (from {SDK_REQUIREMENTS.relative_to(REPO)})."
    if not python.exists() or not SDK_STAMP.exists():
        pytest.fail(f"The official SDK's virtualenv {SDK_VENV} is missing. {fix}", pytrace=False)
    if SDK_STAMP.stat().st_mtime < SDK_REQUIREMENTS.stat().st_mtime:
        pytest.fail(
            f"{SDK_VENV} is older than {SDK_REQUIREMENTS.name}. {fix}",
            pytrace=False,
        )
    wanted = _pinned("cybersource-rest-client-python")
    probe = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "import importlib.metadata as m; print(m.version('cybersource-rest-client-python'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    installed = probe.stdout.strip()
    if probe.returncode != 0 or installed != wanted:
        pytest.fail(
            f"{SDK_VENV} has cybersource-rest-client-python {installed or '(none)'}, "
            f"the requirements pin {wanted}. {fix}",
            pytrace=False,
        )
    return python


def _write_tls_files(directory: Path) -> TlsFiles:
    ca = tlsgen.new_ca("flexsim conformance test CA")
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca_cert.write_bytes(ca.cert_pem)
    server = tlsgen.issue_server(ca, ("localhost", "127.0.0.1"))
    files.server_cert.write_bytes(server.cert_pem)
    files.server_key.write_bytes(server.key_pem)
    files.server_key.chmod(0o600)
    return files


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A fresh CA and server certificate for this module's simulator."""
    return _write_tls_files(tmp_path_factory.mktemp("tls"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _relay_command() -> Path:
    relay = Path(sys.executable).parent / "relay"
    if not relay.exists():
        pytest.fail(
            f"No `relay` console script next to {sys.executable}; run `make test`.", pytrace=False
        )
    return relay


def _wait_until_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"relay flexsim serve exited with {proc.returncode} before listening:\n"
                f"{log.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(
        f"relay flexsim serve did not accept connections on port {port} within "
        f"{STARTUP_TIMEOUT:.0f} s:\n{log.read_text(errors='replace')[-4000:]}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=SHUTDOWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.fixture(scope="module")
def simulator(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    """The Flex simulator over HTTPS on a free loopback port; it must stop cleanly on SIGTERM."""
    port = _free_port()
    sim = Simulator(
        host="127.0.0.1",
        port=port,
        merchant_id="conformance_merchant",
        key_id=str(uuid.uuid4()),
        shared_secret=base64.b64encode(secrets.token_bytes(32)).decode(),
        ca_cert=tls_files.ca_cert,
        log=tmp_path_factory.mktemp("flexsim") / "flexsim.log",
    )
    command = [
        str(_relay_command()),
        "flexsim",
        "serve",
        "--host",
        sim.host,
        "--port",
        str(port),
        "--merchant-id",
        sim.merchant_id,
        "--key-id",
        sim.key_id,
        "--shared-secret",
        sim.shared_secret,
        "--tls-cert",
        str(tls_files.server_cert),
        "--tls-key",
        str(tls_files.server_key),
    ]
    with sim.log.open("wb") as log_file:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        _wait_until_listening(proc, port, sim.log)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    yield sim
    early = proc.poll()
    code = _stop(proc) if early is None else None
    output = sim.log.read_text(errors="replace")[-4000:]
    assert early is None, f"simulator died during the tests with {early}:\n{output}"
    assert code is not None, f"simulator ignored SIGTERM for {SHUTDOWN_TIMEOUT} s:\n{output}"
    assert code == 0, f"simulator exited with {code} on SIGTERM:\n{output}"


def _sdk_env() -> dict[str, str]:
    # The SDK's trust comes only from the CA argument; keep the host's CA settings out of it.
    dropped = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    return {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("PYTHON")}


@pytest.fixture
def run_sdk(sdk_python: Path, tmp_path: Path):
    """Run sdk_client.py with the SDK's python and return its parsed JSON line."""

    def run(sim: Simulator, **overrides: str) -> SdkResult:
        values = {
            "host": sim.address,
            "merchant_id": sim.merchant_id,
            "key_id": sim.key_id,
            "shared_secret": sim.shared_secret,
            "ca_cert": str(sim.ca_cert),
        } | overrides
        args = [values[k] for k in ("host", "merchant_id", "key_id", "shared_secret", "ca_cert")]
        proc = subprocess.run(
            [str(sdk_python), "-I", str(SDK_CLIENT), *args],
            capture_output=True,
            text=True,
            timeout=SDK_TIMEOUT,
            cwd=tmp_path,
            env=_sdk_env(),
            check=False,
        )
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 1, (
            f"sdk_client.py printed {len(lines)} lines (rc {proc.returncode}):\n"
            f"{proc.stdout}\nstderr:\n{proc.stderr}"
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return SdkResult(proc.returncode, json.loads(lines[0]), proc.stderr, args)

    return run
