"""`relay demo`: the three parties on embedded defaults, each in its own process, as deployed.

It makes throwaway certificates, a KEK and a fingerprint key in a temp dir; starts the Flex
simulator, seeds the PCI side's SQLite vault with public test cards (inside the PCI side's own
command, so no card number passes through this process), starts PciRelay and the
MerchantGateway over mutual TLS, then acts as a merchant app: one RequestTokens stream for
every demo card, a table of masked results, one decoded token, and throughput and latency.
With --flex-url and credentials it runs the same flow against a real Flex endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from relay import rpc, tlsgen
from relay.cards import CARD_TYPE_NAMES
from relay.errors import ConfigError
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc
from relay.procs import Child
from relay.progress import Progress

MERCHANT_ID = "demo_merchant"
TEST_FLEX_ORIGINS = "https://apitest.cybersource.com,https://testflex.cybersource.com"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo` to the relay command."""
    demo = commands.add_parser("demo", help="run the three parties end to end on loopback")
    demo.add_argument("--rounds", type=int, default=1, help="times to tokenize each card")
    demo.add_argument("--flex-url", help="a real Flex base URL instead of the simulator")
    demo.add_argument("--merchant-id", help="the Cybersource merchant id (with --flex-url)")
    demo.add_argument("--key-id", help="the shared-secret key id (with --flex-url)")
    demo.add_argument("--shared-secret-file", type=Path, help="the base64 secret (with --flex-url)")
    demo.add_argument("--flex-origins", default=TEST_FLEX_ORIGINS, help="allowed flx.origin values")
    demo.set_defaults(func=lambda args: asyncio.run(run(args)))


@dataclass(frozen=True, slots=True)
class Row:
    """One tokenized card as the merchant sees it, and how long its request took."""

    card_ref: str
    masked_pan: str
    card_type: str
    jti: str
    expires_at: int
    token: str
    seconds: float


async def run(args: argparse.Namespace) -> int:
    """Start everything, tokenize, report; always shut the children down."""
    real = _real_flex(args)
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as tmp:
        files = _write_secrets(Path(tmp), real)
        async with contextlib.AsyncExitStack() as stack:
            flex_url = real[0] if real else await _start_simulator(stack, files)
            env = _env(files, flex_url, real, args.flex_origins)
            card_refs = await _seed(env)
            pci = await _start(stack, "pci", ["pci", "serve", "--port", "0"], env, "pci_listening")
            env["RELAY_MERCHANT_PCI_TARGET"] = f"127.0.0.1:{pci['port']}"
            gateway = await _start(
                stack, "merchant", ["merchant", "serve", "--port", "0"], env, "merchant_listening"
            )
            rows, elapsed = await _tokenize(files, gateway["port"], card_refs * args.rounds)
    return 0 if _report(rows, elapsed) else 1


def _real_flex(args: argparse.Namespace) -> tuple[str, str, str, str] | None:
    if not args.flex_url:
        return None
    if not (args.merchant_id and args.key_id and args.shared_secret_file):
        raise ConfigError(["--flex-url needs --merchant-id, --key-id and --shared-secret-file"])
    try:
        secret = args.shared_secret_file.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(["--shared-secret-file cannot be read"]) from None
    return args.flex_url.rstrip("/"), args.merchant_id, args.key_id, secret


def _write_secrets(tmp: Path, real: tuple[str, str, str, str] | None) -> dict[str, str]:
    ca = tlsgen.new_ca("relay demo CA")
    (tmp / "ca.crt").write_bytes(ca.cert_pem)
    files = {"ca": str(tmp / "ca.crt"), "dir": str(tmp)}
    for name, issued in (
        ("pci", tlsgen.issue_server(ca)),
        ("gateway", tlsgen.issue_server(ca)),
        ("merchant", tlsgen.issue_client(ca, MERCHANT_ID)),
        ("app", tlsgen.issue_client(ca, "demo-app")),
    ):
        cert, key = issued.write(tmp, name)
        files[f"{name}_cert"], files[f"{name}_key"] = str(cert), str(key)
    secret = real[3] if real else base64.b64encode(secrets.token_bytes(32)).decode()
    files["shared_secret"] = _secret_file(tmp / "shared_secret", secret)
    files["kek"] = _secret_file(
        tmp / "kek", "1:" + base64.b64encode(secrets.token_bytes(32)).decode()
    )
    files["fingerprint"] = _secret_file(
        tmp / "fingerprint", base64.b64encode(secrets.token_bytes(32)).decode()
    )
    files["merchant_id"], files["key_id"] = (
        (real[1], real[2]) if real else (MERCHANT_ID, "demo-key")
    )
    return files


def _secret_file(path: Path, text: str) -> str:
    path.touch(mode=0o600)
    path.write_text(text + "\n", encoding="utf-8")
    return str(path)


def _env(
    files: dict[str, str], flex_url: str, real: tuple[str, ...] | None, origins: str
) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update(
        RELAY_LOG_LEVEL="warning",
        RELAY_FLEX_BASE_URL=flex_url,
        RELAY_FLEX_MERCHANT_ID=files["merchant_id"],
        RELAY_FLEX_KEY_ID=files["key_id"],
        RELAY_FLEX_SHARED_SECRET_FILE=files["shared_secret"],
        RELAY_VAULT_URL=f"sqlite:///{files['dir']}/vault.db",
        RELAY_VAULT_KEK_FILE=files["kek"],
        RELAY_VAULT_FINGERPRINT_KEY_FILE=files["fingerprint"],
        RELAY_PCI_TLS_CERT_FILE=files["pci_cert"],
        RELAY_PCI_TLS_KEY_FILE=files["pci_key"],
        RELAY_PCI_CLIENT_CA_FILE=files["ca"],
        RELAY_MERCHANT_TLS_CERT_FILE=files["gateway_cert"],
        RELAY_MERCHANT_TLS_KEY_FILE=files["gateway_key"],
        RELAY_MERCHANT_CLIENT_CA_FILE=files["ca"],
        RELAY_MERCHANT_PCI_TLS_CERT_FILE=files["merchant_cert"],
        RELAY_MERCHANT_PCI_TLS_KEY_FILE=files["merchant_key"],
        RELAY_MERCHANT_PCI_CA_FILE=files["ca"],
        RELAY_MERCHANT_PCI_SERVER_NAME="localhost",
    )
    if real:
        env["RELAY_FLEX_ALLOWED_ORIGINS"] = origins
    return env


async def _start_simulator(stack: contextlib.AsyncExitStack, files: dict[str, str]) -> str:
    args = ["flexsim", "serve", "--port", "0", "--merchant-id", files["merchant_id"],
            "--key-id", files["key_id"],
            "--shared-secret-file", files["shared_secret"]]  # fmt: skip
    ready = await _start(stack, "flexsim", args, dict(os.environ), "flexsim_listening")
    return str(ready["url"])


async def _start(
    stack: contextlib.AsyncExitStack, name: str, args: list[str], env: dict[str, str], event: str
) -> dict[str, object]:
    env = {**env, "RELAY_LOG_LEVEL": "info"}  # the ready line is an info event
    child = await Child.start(name, args, ready_event=event, env=env)
    stack.push_async_callback(child.stop)
    return child.ready.result()


async def _seed(env: dict[str, str]) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "pci", "seed-demo", "--merchant", MERCHANT_ID,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise ConfigError([f"seeding the demo vault failed: {err.decode(errors='replace')[-300:]}"])
    return [json.loads(line)["card_ref"] for line in out.decode().splitlines() if line.strip()]


def _app_credentials(files: dict[str, str]) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(files["ca"]).read_bytes(),
        private_key=Path(files["app_key"]).read_bytes(),
        certificate_chain=Path(files["app_cert"]).read_bytes(),
    )


async def _tokenize(
    files: dict[str, str], port: object, card_refs: list[str]
) -> tuple[list[Row], float]:
    credentials = _app_credentials(files)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=options
    ) as channel:
        stub = merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)  # type: ignore[no-untyped-call]
        sent: dict[str, tuple[str, float]] = {}
        progress = Progress(sys.stderr, total=len(card_refs), unit="tokens")
        rows: list[Row] = []
        started = time.perf_counter()
        with _closing(progress):
            async for result in stub.RequestTokens(_requests(card_refs, sent), timeout=120):
                rows.append(_row(result, sent, progress))
                progress.advance(1)
        return rows, time.perf_counter() - started


@contextlib.contextmanager
def _closing(progress: Progress) -> Iterator[None]:
    try:
        yield
    finally:
        progress.close()


async def _requests(
    card_refs: list[str], sent: dict[str, tuple[str, float]]
) -> AsyncIterator[merchant_gateway_pb2.TokenRequest]:
    for index, card_ref in enumerate(card_refs):
        request_id = f"demo-{secrets.token_hex(4)}-{index:04d}"
        sent[request_id] = (card_ref, time.perf_counter())
        yield merchant_gateway_pb2.TokenRequest(request_id=request_id, card_ref=card_ref)


def _row(
    result: merchant_gateway_pb2.TokenResult, sent: dict[str, tuple[str, float]], progress: Progress
) -> Row:
    card_ref, started = sent[result.request_id]
    seconds = time.perf_counter() - started
    if result.WhichOneof("outcome") != "token":
        error = rpc.error_from_pb(result.error)
        progress.message(f"{card_ref}: {error.message} ({error.reason})")
        return Row(card_ref, "-", "-", f"error: {error.reason}", 0, "", seconds)
    token = result.token
    return Row(
        card_ref, token.masked_pan, CARD_TYPE_NAMES.get(token.card_type, token.card_type),
        token.jti, token.expires_at.ToSeconds(), token.transient_token, seconds,
    )  # fmt: skip


def _report(rows: list[Row], elapsed: float) -> bool:
    now = time.time()
    table = [("card_ref", "masked PAN", "type", "TT jti", "expires in")]
    table += [
        (r.card_ref, r.masked_pan, r.card_type, r.jti[:20] + "...", f"{int(r.expires_at - now)} s")
        for r in rows
        if r.token
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for line in table:
        _out("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    first = next((r for r in rows if r.token), None)
    if first is not None:
        claims = json.loads(base64.urlsafe_b64decode(first.token.split(".")[1] + "=="))
        _out(
            f"\ndecoded transient token claims ({first.card_ref}):\n{json.dumps(claims, indent=2)}"
        )
    latencies = sorted(r.seconds * 1000 for r in rows)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    failed = sum(1 for r in rows if not r.token)
    _out(
        f"\n{len(rows) - failed} tokens ({failed} failed) in {elapsed:.2f} s: "
        f"{len(rows) / elapsed:.1f} tokens/s, p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {p99:.1f} ms"
    )
    return failed == 0


def _out(text: str) -> None:
    print(text)  # noqa: T201  the demo's report is its output
