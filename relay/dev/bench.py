"""`relay bench`: measured numbers for the closing notes, never timed assertions in tests.

`relay bench flex` starts the simulator as its own process and times, over N rounds, one
authenticated session (create + verify the capture context) and one token (encrypt + POST +
verify the transient token), sequentially and then with C in flight.

`relay bench e2e` starts the whole local stack (relay.dev.stack) and measures the three-party
path: plain sequential RequestToken calls next to one RequestTokens bulk stream.

The sides add scenarios of their own through the `relay.bench` entry-point group (pci_side:
`relay bench records`, the cost of each per-token record on a real vault).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import importlib.metadata
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from relay.cards import CardData, Pan, SecurityCode, luhn_ok
from relay.config import FlexConfig, FlexCredentials
from relay.dev.procs import Child
from relay.dev.stack import local_stack
from relay.flex.client import FlexClient, new_http_client
from relay.flex.models import CaptureContext
from relay.flex.signing import decode_shared_secret
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc

T = TypeVar("T")
SCENARIO_GROUP = "relay.bench"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bench` to the relay command."""
    bench = commands.add_parser("bench", help="measure throughput and latency on loopback")
    scenarios = bench.add_subparsers(dest="scenario", required=True)
    flex = scenarios.add_parser("flex", help="sessions and tokens against the simulator")
    flex.add_argument("--rounds", type=int, default=200)
    flex.add_argument("--concurrency", type=int, default=8)
    flex.add_argument("--pool-size", type=int, default=256, help="simulator one-time key pool")
    flex.set_defaults(func=lambda a: asyncio.run(bench_flex(a.rounds, a.concurrency, a.pool_size)))
    e2e = scenarios.add_parser(
        "e2e", help="the three-party path: sequential RequestToken calls, then one bulk stream"
    )
    e2e.add_argument("--requests", type=int, default=500)
    e2e.add_argument("--sequential", type=int, default=100, help="unary calls, one at a time")
    e2e.add_argument(
        "--pool-size", type=int, default=700, help="simulator one-time keys made ahead"
    )
    e2e.set_defaults(func=lambda a: asyncio.run(bench_e2e(a.requests, a.sequential, a.pool_size)))
    # Scenarios of the sides (relay knows neither): e.g. pci_side's `records`.
    for entry_point in sorted(
        importlib.metadata.entry_points(group=SCENARIO_GROUP), key=lambda ep: ep.name
    ):
        entry_point.load()(scenarios)


async def bench_e2e(requests: int, sequential: int, pool_size: int) -> int:
    """Tokens/s and latency through merchant gateway, PciRelay and the simulator."""
    # The rate limits guard against enumeration; a bench is one merchant and one app on purpose.
    limits = {
        "RELAY_PCI_RATE_PER_SECOND": "100000",
        "RELAY_PCI_RATE_BURST": "100000",
        "RELAY_MERCHANT_APP_RATE": "100000",
        "RELAY_MERCHANT_APP_BURST": "100000",
    }
    async with local_stack(pool_size=pool_size, settings=limits) as stack:
        # One-time RSA keys are made at ~20-25/s on this kind of machine; let the pool fill so
        # the numbers measure the relay, not the simulator's keygen.
        await asyncio.sleep(min(90.0, pool_size / 20))
        async with stack.gateway_channel() as channel:
            stub = merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)  # type: ignore[no-untyped-call]
            refs = stack.card_refs
            latencies: list[float] = []
            cpu = _CPU(stack.pids)
            started = time.perf_counter()
            for index in range(sequential):
                request = merchant_gateway_pb2.TokenRequest(
                    request_id=f"seq-{index}", card_ref=refs[index % len(refs)]
                )
                call_started = time.perf_counter()
                await stub.RequestToken(request, timeout=30)
                latencies.append((time.perf_counter() - call_started) * 1000)
            _report_e2e("sequential RequestToken", latencies, time.perf_counter() - started)
            cpu.report(sequential)
            cpu = _CPU(stack.pids)
            await _bulk(stub, refs, requests)
            cpu.report(requests)
    return 0


class _CPU:
    """CPU time each child process spent since this reading, per token (Linux /proc)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start = {name: _cpu_seconds(pid) for name, pid in pids.items()}

    def report(self, tokens: int) -> None:
        parts = []
        for name, pid in self._pids.items():
            before, after = self._start[name], _cpu_seconds(pid)
            if before is None or after is None or tokens == 0:
                parts.append(f"{name} n/a")
            else:
                parts.append(f"{name} {(after - before) / tokens * 1e6:,.0f} us")
        print("  CPU per token: " + ", ".join(parts))  # noqa: T201


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of a process and its threads, from /proc (else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _bulk(stub: Any, refs: list[str], count: int) -> None:  # noqa: ANN401
    sent: dict[str, float] = {}

    async def requests() -> AsyncIterator[merchant_gateway_pb2.TokenRequest]:
        for index in range(count):
            sent[f"bulk-{index}"] = time.perf_counter()
            yield merchant_gateway_pb2.TokenRequest(
                request_id=f"bulk-{index}", card_ref=refs[index % len(refs)]
            )

    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    async for result in stub.RequestTokens(requests(), timeout=300):
        latencies.append((time.perf_counter() - sent[result.request_id]) * 1000)
        if result.WhichOneof("outcome") != "token":
            failures[result.error.reason] += 1
    title = f"one RequestTokens stream (failed: {dict(failures) or 0})"
    _report_e2e(title, latencies, time.perf_counter() - started)


def _report_e2e(title: str, latencies: list[float], elapsed: float) -> None:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(  # noqa: T201
        f"{title}: {len(ordered)} tokens in {elapsed:.2f} s = "
        f"{len(ordered) / elapsed:.1f} tokens/s; "
        f"p50 {statistics.median(ordered):.1f} ms, p90 {ordered[int(len(ordered) * 0.9)]:.1f} ms, "
        f"p99 {p99:.1f} ms"
    )


async def bench_flex(rounds: int, concurrency: int, pool_size: int) -> int:
    """Time sessions and tokens against a simulator child process; print a summary."""
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    sim = await Child.start(
        "flexsim",
        ["flexsim", "serve", "--port", "0", "--merchant-id", "bench", "--key-id", "bench-key",
         "--shared-secret", secret, "--pool-size", str(pool_size)],
        ready_event="flexsim_listening",
    )  # fmt: skip
    try:
        credentials = FlexCredentials("bench", "bench-key", decode_shared_secret(secret))
        config = FlexConfig(base_url=str(sim.ready.result()["url"]), credentials=credentials)
        await asyncio.sleep(
            min(60.0, pool_size / 20)
        )  # keygen runs at ~20-25 keys/s: let the pool fill
        async with new_http_client(config) as http:
            flex = FlexClient(http, config)
            await _run_flex(flex, rounds, concurrency)
    finally:
        await sim.stop()
    return 0


def generated_card() -> CardData:
    """A Luhn-valid card on the public Visa test BIN with random digits, made for the run."""
    body = "411111" + "".join(secrets.choice("0123456789") for _ in range(9))
    check = next(d for d in "0123456789" if luhn_ok(body + d))
    return CardData(Pan(body + check), 12, time.gmtime().tm_year + 3, SecurityCode("123"))


async def _run_flex(flex: FlexClient, rounds: int, concurrency: int) -> None:
    card = generated_card()
    await _token_round(flex, card, [], [])  # warm up: connection, key cache
    sessions: list[float] = []
    tokens: list[float] = []
    started = time.perf_counter()
    for _ in range(rounds):
        await _token_round(flex, card, sessions, tokens)
    sequential = time.perf_counter() - started
    _report(f"sequential, {rounds} rounds", sessions, tokens, rounds / sequential)
    sessions, tokens = [], []
    limit = asyncio.Semaphore(concurrency)

    async def bounded() -> None:
        async with limit:
            await _token_round(flex, card, sessions, tokens)

    started = time.perf_counter()
    await asyncio.gather(*(bounded() for _ in range(rounds)))
    concurrent = time.perf_counter() - started
    _report(f"{concurrency} in flight, {rounds} rounds", sessions, tokens, rounds / concurrent)


async def _token_round(
    flex: FlexClient, card: CardData, sessions: list[float], tokens: list[float]
) -> None:
    ctx = await _timed(sessions, lambda: _session(flex))
    await _timed(tokens, lambda: _token(flex, ctx, card))


async def _session(flex: FlexClient) -> CaptureContext:
    return await flex.verify_capture_context(await flex.create_session())


async def _token(flex: FlexClient, ctx: CaptureContext, card: CardData) -> None:
    flex.verify_transient_token(await flex.post_token(ctx, flex.encrypt_card(ctx, card)), ctx)


async def _timed(into: list[float], call: Callable[[], Awaitable[T]]) -> T:
    started = time.perf_counter()
    result = await call()
    into.append((time.perf_counter() - started) * 1000)
    return result


def _report(title: str, sessions: list[float], tokens: list[float], rate: float) -> None:
    print(f"{title}: {rate:.1f} session+token rounds/s")  # noqa: T201
    for name, samples in (("session", sessions), ("token", tokens)):
        ordered = sorted(samples)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(  # noqa: T201
            f"  {name:8s} median {statistics.median(ordered):6.2f} ms  "
            f"p90 {ordered[int(len(ordered) * 0.9)]:6.2f} ms  p99 {p99:6.2f} ms"
        )
