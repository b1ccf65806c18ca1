"""`relay demo`: the three parties on embedded defaults, each in its own process, as deployed.

relay.dev.stack starts the simulator, the PCI side (its vault seeded with public test cards by the
PCI side's own command) and the MerchantGateway over mutual TLS. The demo then acts as a
merchant app: one RequestTokens stream for every demo card, a table of masked results, one
decoded token, its receipt verified with the PCI side's public key, and throughput and
latency. With --flex-url and credentials it runs the same flow against a real Flex endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from relay import rpc
from relay.cards import CARD_TYPE_NAMES
from relay.dev.stack import LocalStack, RealFlex, local_stack
from relay.errors import ConfigError, ReceiptInvalid
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc
from relay.receipts import verify_receipt

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
    receipt: str = ""


async def run(args: argparse.Namespace) -> int:
    """Start everything, tokenize, report; always shut the children down."""
    async with local_stack(real_flex(args), flex_origins=args.flex_origins) as stack:
        rows, elapsed = await _tokenize(stack, stack.card_refs * args.rounds)
    reported = _report(rows, elapsed)
    verified = _verify_first_receipt(rows, stack.receipt_public_key)
    return 0 if reported and verified else 1


def real_flex(args: argparse.Namespace) -> RealFlex | None:
    """The real Flex endpoint and credentials named on the command line, if any."""
    if not args.flex_url:
        return None
    if not (args.merchant_id and args.key_id and args.shared_secret_file):
        raise ConfigError(["--flex-url needs --merchant-id, --key-id and --shared-secret-file"])
    try:
        secret = args.shared_secret_file.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(["--shared-secret-file cannot be read"]) from None
    return RealFlex(args.flex_url.rstrip("/"), args.merchant_id, args.key_id, secret)


async def _tokenize(stack: LocalStack, card_refs: list[str]) -> tuple[list[Row], float]:
    async with stack.gateway_channel() as channel:
        stub = merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)  # type: ignore[no-untyped-call]
        sent: dict[str, tuple[str, float]] = {}
        started = time.perf_counter()
        results = stub.RequestTokens(_requests(card_refs, sent), timeout=120)
        rows = [_row(result, sent) async for result in results]
        return rows, time.perf_counter() - started


async def _requests(
    card_refs: list[str], sent: dict[str, tuple[str, float]]
) -> AsyncIterator[merchant_gateway_pb2.TokenRequest]:
    for index, card_ref in enumerate(card_refs):
        request_id = f"demo-{secrets.token_hex(4)}-{index:04d}"
        sent[request_id] = (card_ref, time.perf_counter())
        yield merchant_gateway_pb2.TokenRequest(request_id=request_id, card_ref=card_ref)


def _row(result: merchant_gateway_pb2.TokenResult, sent: dict[str, tuple[str, float]]) -> Row:
    card_ref, started = sent[result.request_id]
    seconds = time.perf_counter() - started
    if result.WhichOneof("outcome") != "token":
        error = rpc.error_from_pb(result.error)
        print(f"{card_ref}: {error.message} ({error.reason})", file=sys.stderr)  # noqa: T201
        return Row(card_ref, "-", "-", f"error: {error.reason}", 0, "", seconds)
    token = result.token
    return Row(
        card_ref, token.masked_pan, CARD_TYPE_NAMES.get(token.card_type, token.card_type),
        token.jti, token.expires_at.ToSeconds(), token.transient_token, seconds, token.receipt,
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


def _verify_first_receipt(rows: list[Row], public_key_pem: bytes) -> bool:
    """Check the first token's receipt offline, as a merchant app would."""
    first = next((r for r in rows if r.token), None)
    if first is None:
        return True
    try:
        receipt = verify_receipt(first.receipt, public_key_pem, transient_token=first.token)
    except ReceiptInvalid as exc:
        _out(f"receipt NOT verified ({first.card_ref}): {exc.message}")
        return False
    _out(f"receipt verified: request_id={receipt.request_id} tt_jti={receipt.tt_jti}")
    return True


def _out(text: str) -> None:
    print(text)  # noqa: T201  the demo's report is its output
