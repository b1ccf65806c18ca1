"""A local three-party stack, each party its own `relay` process, as deployed.

Used by `relay demo` and `relay bench`. It writes throwaway certificates (relay.dev.tlsgen), a KEK
keyring, a fingerprint key, an audit key, the receipt signing key (and its public half, which
the demo verifies receipts with) and the Flex shared secret into a temp dir (files, mode 0600,
as Kubernetes Secrets would mount them), starts the Flex simulator (unless a real Flex is
named), has the PCI side seed its own vault with public test cards (`relay pci seed-demo`: no
card number passes through this process), then starts PciRelay and the MerchantGateway over
mutual TLS on free loopback ports. Leaving the context stops every child with SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import secrets
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from relay.dev import tlsgen
from relay.dev.procs import Child
from relay.errors import ConfigError
from relay.receipts import ReceiptSigner, generate_receipt_key

MERCHANT_ID = "demo_merchant"


@dataclasses.dataclass(frozen=True, slots=True)
class RealFlex:
    """A real Flex endpoint and the merchant's credentials for it."""

    base_url: str
    merchant_id: str
    key_id: str
    shared_secret: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class LocalStack:
    """A running stack: where the gateway listens and what a merchant app needs to call it."""

    gateway_port: int
    card_refs: list[str]
    ca_file: Path
    app_cert_file: Path
    app_key_file: Path
    pids: dict[str, int] = dataclasses.field(default_factory=dict)
    """The process id of each child by name ("flexsim", "pci", "merchant"), for CPU readings."""
    receipt_public_key: bytes = b""
    """The PCI side's receipt public key (PEM): what a merchant app verifies receipts with."""

    def gateway_channel(self) -> grpc.aio.Channel:
        """A mutually authenticated channel to the gateway, as a merchant app (demo-app)."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.app_key_file.read_bytes(),
            certificate_chain=self.app_cert_file.read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.gateway_port}", credentials, options=options
        )


@contextlib.asynccontextmanager
async def local_stack(
    real: RealFlex | None = None,
    *,
    flex_origins: str = "",
    pool_size: int = 32,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[LocalStack]:
    """Start simulator (or use real Flex), PciRelay and MerchantGateway; stop them on exit.

    settings: extra RELAY_* variables for both sides (e.g. a higher rate limit for a bench).
    """
    with tempfile.TemporaryDirectory(prefix="relay-stack-") as tmp:
        files = _write_secrets(Path(tmp), real)
        async with contextlib.AsyncExitStack() as children:
            pids: dict[str, int] = {}
            flex_url = real.base_url if real else await _simulator(children, files, pool_size, pids)
            env = _env(files, flex_url)
            if real is not None and flex_origins:
                env["RELAY_FLEX_ALLOWED_ORIGINS"] = flex_origins
            env.update(settings or {})
            card_refs = await _seed(env)
            pci = await _start(
                children, "pci", ["pci", "serve", "--port", "0"], env, "pci_listening"
            )
            pids["pci"] = pci.process.pid
            env["RELAY_MERCHANT_PCI_TARGET"] = f"127.0.0.1:{pci.ready.result()['port']}"
            gateway = await _start(
                children,
                "merchant",
                ["merchant", "serve", "--port", "0"],
                env,
                "merchant_listening",
            )
            pids["merchant"] = gateway.process.pid
            yield LocalStack(
                gateway_port=int(str(gateway.ready.result()["port"])),
                card_refs=card_refs,
                ca_file=Path(files["ca"]),
                app_cert_file=Path(files["app_cert"]),
                app_key_file=Path(files["app_key"]),
                pids=pids,
                receipt_public_key=files["receipt_public_key"].encode("ascii"),
            )


def _write_secrets(tmp: Path, real: RealFlex | None) -> dict[str, str]:
    ca = tlsgen.new_ca("relay local stack CA")
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    files = {"ca": str(tmp / "ca.crt"), "dir": str(tmp)}
    for name, issued in (
        ("pci", tlsgen.issue_server(ca)),
        ("gateway", tlsgen.issue_server(ca)),
        ("merchant", tlsgen.issue_client(ca, MERCHANT_ID)),
        ("app", tlsgen.issue_app(ca, "demo-app")),
    ):
        cert, key = issued.write(tmp, name)
        files[f"{name}_cert"], files[f"{name}_key"] = str(cert), str(key)
    secret = real.shared_secret if real else _random_b64()
    files["shared_secret"] = _secret_file(tmp / "shared_secret", secret)
    files["kek"] = _secret_file(tmp / "kek", "1:" + _random_b64())
    files["fingerprint"] = _secret_file(tmp / "fingerprint", _random_b64())
    files["receipt_key"], files["receipt_public_key"] = _receipt_key(tmp)
    audit_key = tmp / "audit.key"
    audit_key.touch(mode=0o600)
    audit_key.write_bytes(secrets.token_bytes(32))
    files["audit_key"] = str(audit_key)
    files["merchant_id"] = real.merchant_id if real else MERCHANT_ID
    files["key_id"] = real.key_id if real else "demo-key"
    return files


def _receipt_key(tmp: Path) -> tuple[str, str]:
    """The PCI side's receipt signing key file (0600), and its public half as PEM text."""
    key = tmp / "receipt.key"
    key.touch(mode=0o600)
    pem = generate_receipt_key()
    key.write_bytes(pem)
    return str(key), ReceiptSigner(pem).public_pem().decode("ascii")


def _random_b64() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _secret_file(path: Path, text: str) -> str:
    path.touch(mode=0o600)
    path.chmod(0o600)  # touch keeps the mode of a file that exists already
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def _env(files: dict[str, str], flex_url: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update(
        RELAY_LOG_LEVEL="info",
        RELAY_FLEX_BASE_URL=flex_url,
        RELAY_FLEX_MERCHANT_ID=files["merchant_id"],
        RELAY_FLEX_KEY_ID=files["key_id"],
        RELAY_FLEX_SHARED_SECRET_FILE=files["shared_secret"],
        RELAY_VAULT_URL=f"sqlite:///{files['dir']}/vault.db",
        RELAY_VAULT_KEK_FILE=files["kek"],
        RELAY_VAULT_FINGERPRINT_KEY_FILE=files["fingerprint"],
        RELAY_VAULT_AUDIT_KEY_FILE=files["audit_key"],
        RELAY_PCI_TLS_CERT_FILE=files["pci_cert"],
        RELAY_PCI_TLS_KEY_FILE=files["pci_key"],
        RELAY_PCI_CLIENT_CA_FILE=files["ca"],
        RELAY_PCI_RECEIPT_KEY_FILE=files["receipt_key"],
        RELAY_MERCHANT_TLS_CERT_FILE=files["gateway_cert"],
        RELAY_MERCHANT_TLS_KEY_FILE=files["gateway_key"],
        RELAY_MERCHANT_CLIENT_CA_FILE=files["ca"],
        RELAY_MERCHANT_PCI_TLS_CERT_FILE=files["merchant_cert"],
        RELAY_MERCHANT_PCI_TLS_KEY_FILE=files["merchant_key"],
        RELAY_MERCHANT_PCI_CA_FILE=files["ca"],
        RELAY_MERCHANT_PCI_SERVER_NAME="localhost",
        # The gateway's ledger is durable, as deployed: a SQLite file beside the vault.
        RELAY_MERCHANT_LEDGER_URL=f"sqlite:///{files['dir']}/ledger.db",
    )
    return env


async def _simulator(
    children: contextlib.AsyncExitStack, files: dict[str, str], pool_size: int, pids: dict[str, int]
) -> str:
    args = ["flexsim", "serve", "--port", "0", "--merchant-id", files["merchant_id"],
            "--key-id", files["key_id"], "--shared-secret-file", files["shared_secret"],
            "--pool-size", str(pool_size)]  # fmt: skip
    child = await _start(children, "flexsim", args, dict(os.environ), "flexsim_listening")
    pids["flexsim"] = child.process.pid
    return str(child.ready.result()["url"])


async def _start(
    children: contextlib.AsyncExitStack,
    name: str,
    args: list[str],
    env: dict[str, str],
    event: str,
) -> Child:
    child = await Child.start(name, args, ready_event=event, env=env)
    children.push_async_callback(child.stop)
    return child


async def _seed(env: dict[str, str]) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "pci", "seed-demo", "--merchant", MERCHANT_ID,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError([f"seeding the demo vault failed: {tail[0]}"])
    return [json.loads(line)["card_ref"] for line in out.decode().splitlines() if line.strip()]
