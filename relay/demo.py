"""`relay demo`: the Flex v2 flow on embedded defaults, with every party in its own process.

It starts the simulator as a child process, then tokenizes a set of demo cards through the
whole Flex flow (session, capture-context check, JWE, /tokens, transient-token check) and
prints a table of masked results, one decoded token, and throughput and latency figures.
The demo cards are generated from public test BINs at start, so no card number is stored here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import secrets
import statistics
import time
from dataclasses import dataclass

from relay.cards import CARD_TYPE_NAMES, CardData, Pan, SecurityCode, luhn_ok
from relay.config import FlexConfig, FlexCredentials
from relay.flex.client import FlexClient, new_http_client
from relay.flex.models import TransientToken
from relay.flex.signing import decode_shared_secret
from relay.procs import Child

# Public test BINs and lengths of the networks the demo shows.
DEMO_BINS = (
    ("411111", 16),
    ("400005", 16),
    ("555555", 16),
    ("222300", 16),
    ("378282", 15),
    ("371449", 15),
    ("601111", 16),
    ("305693", 14),
    ("353011", 16),
    ("356600", 16),
    ("675964", 16),
    ("620000", 16),
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo` to the relay command."""
    demo = commands.add_parser("demo", help="run the Flex v2 flow end to end on loopback")
    demo.add_argument("--rounds", type=int, default=1, help="times to tokenize each card")
    demo.set_defaults(func=lambda args: asyncio.run(run(args.rounds)))


def demo_card(prefix: str, length: int) -> CardData:
    """A Luhn-valid card on a test BIN with random middle digits, valid for a few years."""
    body = prefix + "".join(secrets.choice("0123456789") for _ in range(length - len(prefix) - 1))
    check = next(d for d in "0123456789" if luhn_ok(body + d))
    code = SecurityCode("1234" if length == 15 else "123")
    return CardData(Pan(body + check), 12, time.gmtime().tm_year + 3, code)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One tokenized card: its label, its verified token, and how long it took."""

    label: str
    token: TransientToken
    seconds: float


async def run(rounds: int) -> int:
    """Start the simulator, tokenize the demo cards, print the results; exit 0 on success."""
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    sim = await Child.start(
        "flexsim",
        ["flexsim", "serve", "--port", "0", "--merchant-id", "demo_merchant",
         "--key-id", "demo-key", "--shared-secret", secret],
        ready_event="flexsim_listening",
    )  # fmt: skip
    try:
        url = str(sim.ready.result()["url"])
        credentials = FlexCredentials("demo_merchant", "demo-key", decode_shared_secret(secret))
        config = FlexConfig(base_url=url, credentials=credentials)
        started = time.perf_counter()
        outcomes = await _tokenize_all(config, rounds)
        elapsed = time.perf_counter() - started
    finally:
        code = await sim.stop()
    _print_report(outcomes, elapsed)
    return 0 if code == 0 else 1


async def _tokenize_all(config: FlexConfig, rounds: int) -> list[Outcome]:
    cards = [(f"card-{i + 1:02d}", demo_card(*bin_)) for i, bin_ in enumerate(DEMO_BINS)]
    async with new_http_client(config) as http:
        flex = FlexClient(http, config)
        jobs = [_tokenize(flex, label, card) for _ in range(rounds) for label, card in cards]
        return list(await asyncio.gather(*jobs))


async def _tokenize(flex: FlexClient, label: str, card: CardData) -> Outcome:
    started = time.perf_counter()
    ctx = await flex.verify_capture_context(await flex.create_session())
    token = flex.verify_transient_token(
        await flex.post_token(ctx, flex.encrypt_card(ctx, card)), ctx
    )
    return Outcome(label, token, time.perf_counter() - started)


def _print_report(outcomes: list[Outcome], elapsed: float) -> None:
    now = time.time()
    rows = [("card_ref", "masked PAN", "type", "TT jti", "expires in")]
    rows += [
        (
            o.label,
            o.token.masked_pan,
            CARD_TYPE_NAMES.get(o.token.card_type, o.token.card_type),
            o.token.jti[:16] + "...",
            f"{int(o.token.expires_at - now)} s",
        )
        for o in outcomes
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))  # noqa: T201
    claims = json.loads(base64.urlsafe_b64decode(outcomes[0].token.raw.split(".")[1] + "=="))
    print("\ndecoded transient token claims (first card):")  # noqa: T201
    print(json.dumps(claims, indent=2))  # noqa: T201
    latencies = sorted(o.seconds * 1000 for o in outcomes)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(  # noqa: T201
        f"\n{len(outcomes)} tokens in {elapsed:.2f} s: {len(outcomes) / elapsed:.1f} tokens/s, "
        f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms"
    )
