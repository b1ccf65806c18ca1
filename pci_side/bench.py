"""`relay bench records`: what PciRelay's own per-token records cost, on a real vault.

Each successful tokenization claims its capture context (one release per context, on every
replica), takes a rate token for its merchant (shared across replicas on PostgreSQL), and
signs a receipt. This times each of them alone, N times in a row and then N with C at once,
next to the write-ahead audit append a token already cost before them, on a throwaway SQLite
vault or on the PostgreSQL vault named by --vault-url (its own schema objects are used as
they are: point it at a scratch database).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pci_side.vault import AuditEntry, CardVault, ContextUse, create_keyring, open_vault
from relay.config import VaultConfig
from relay.receipts import Receipt, ReceiptSigner, generate_receipt_key, token_sha256
from relay.secrets import Secret

Step = Callable[[int], Awaitable[object]]


def register(scenarios: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `records` to `relay bench`."""
    records = scenarios.add_parser(
        "records", help="PciRelay's per-token records: context claim, rate token, receipt"
    )
    records.add_argument("--rounds", type=int, default=2000)
    records.add_argument("--concurrency", type=int, default=32)
    records.add_argument("--vault-url", default=None, help="a postgresql:// DSN (default SQLite)")
    records.set_defaults(
        func=lambda a: asyncio.run(bench_records(a.rounds, a.concurrency, a.vault_url))
    )


async def bench_records(rounds: int, concurrency: int, vault_url: str | None) -> int:
    """Print µs per operation (wall, and this process's CPU) for each record."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        config = _throwaway_config(Path(tmp), vault_url)
        async with await open_vault(config) as vault:
            print(f"vault: {config.backend}, {rounds} rounds, then {concurrency} at once")  # noqa: T201
            run = secrets.token_hex(4)
            for title, step in _steps(vault, run).items():
                await _measure(title, step, rounds, concurrency)
    return 0


def _steps(vault: CardVault, run: str) -> dict[str, Step]:
    signer = ReceiptSigner(generate_receipt_key())
    token = "eyJ" + "a" * 900  # the size of a transient token's compact text
    expires = int(time.time()) + 900

    async def claim(i: int) -> object:
        use = ContextUse(f"cc-{run}-{i}", "m-bench", "app", f"r-{i}", "card", expires, run)
        return await vault.claim_context(use)

    async def rate(_i: int) -> object:
        await vault.take_rate_token("m-bench", 1e9, 1_000_000_000)
        return None

    async def receipt(i: int) -> object:
        claims = Receipt(
            "m-bench", "app", f"r-{i}", "card", f"cc-{i}", f"tt-{i}", token_sha256(token), 0
        )
        return signer.sign(claims)

    async def audit(i: int) -> object:
        entry = AuditEntry("m-bench", "card", f"r-{i}", f"cc-{run}-{i}", "", "started", "")
        return await vault.record_attempt(entry)

    return {
        "context claim": claim,
        "rate token": rate,
        "receipt signature": receipt,
        "audit append (for scale)": audit,
    }


async def _measure(title: str, step: Step, rounds: int, concurrency: int) -> None:
    latencies = []
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(rounds):
        started = time.perf_counter()
        await step(i)
        latencies.append((time.perf_counter() - started) * 1e6)
    cpu_each = (time.process_time() - cpu) / rounds * 1e6
    sequential = time.perf_counter() - wall
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with semaphore:
            await step(rounds + i)

    wall = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(rounds)))
    parallel = time.perf_counter() - wall
    latencies.sort()
    print(  # noqa: T201
        f"{title:>26}: median {statistics.median(latencies):,.0f} us, "
        f"p99 {latencies[int(len(latencies) * 0.99) - 1]:,.0f} us, CPU {cpu_each:,.0f} us; "
        f"{rounds / sequential:,.0f}/s in a row, {rounds / parallel:,.0f}/s {concurrency} at once"
    )


def _throwaway_config(tmp: Path, vault_url: str | None) -> VaultConfig:
    kek = tmp / "kek.keys"
    create_keyring(kek)
    return VaultConfig(
        url=Secret(vault_url or f"sqlite:///{tmp / 'vault.db'}"),
        kek_file=str(kek),
        fingerprint_key=Secret(secrets.token_bytes(32)),
        audit_key=Secret(secrets.token_bytes(32)),
    )
