"""Measure the card vault's import rate on SQLite and PostgreSQL (issue 4's closing note).

Imports N generated, Luhn-valid cards (not real accounts, never printed) through
`CardVault.import_cards` in batches, as `relay cards import` does, and prints cards/s for each
backend, for the first import (every card created) and for a re-run (every card unchanged).
The PostgreSQL run uses a throwaway database on the server at --postgres (default:
RELAY_TEST_POSTGRES_DSN, else 127.0.0.1:5432 as user postgres) and drops it afterwards.

    .venv/bin/python scripts/bench_vault_import.py [--cards 10000] [--batch 500] [--postgres DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psycopg
import psycopg.conninfo

from pci_side.vault import NewCard, create_keyring, open_vault
from relay.cards import CardData, Pan, SecurityCode, luhn_ok
from relay.config import VaultConfig
from relay.logging import configure_logging
from relay.secrets import Secret


def generated_cards(count: int) -> list[NewCard]:
    """Make count cards with distinct 16-digit PANs, half with a security code, one grant each."""
    cards = []
    for index in range(count):
        body = f"4000{index:011d}"
        digits = next(body + d for d in "0123456789" if luhn_ok(body + d))
        code = SecurityCode(f"{index % 1000:03d}") if index % 2 else None
        card = CardData(Pan(digits), index % 12 + 1, 2030 + index % 5, code)
        cards.append(NewCard(f"bench-{index:07d}", card, ("merchant-1",)))
    return cards


async def import_rate(config: VaultConfig, cards: Sequence[NewCard], batch: int) -> list[float]:
    """cards/s of a first import and of a re-run of the same cards."""
    rates = []
    async with await open_vault(config) as vault:
        for expected in ("created", "unchanged"):
            started = time.perf_counter()
            for start in range(0, len(cards), batch):
                outcomes = await vault.import_cards(cards[start : start + batch])
                assert {expected} == {outcome.status for outcome in outcomes}
            rates.append(len(cards) / (time.perf_counter() - started))
        assert len(cards) == await vault.count_cards()
    return rates


def vault_config(url: str, directory: Path, pool_size: int = 4) -> VaultConfig:
    """A config with a fresh keyring, fingerprint key and audit key."""
    kek_file = directory / "kek"
    if not kek_file.exists():
        create_keyring(kek_file)
    return VaultConfig(
        Secret(url),
        str(kek_file),
        Secret(secrets.token_bytes(32)),
        Secret(secrets.token_bytes(32)),
        pool_size,
    )


@contextmanager
def throwaway_database(dsn: str) -> Iterator[str]:
    """A new database on the server at dsn, as a postgresql:// URL; dropped afterwards."""
    name = f"relay_bench_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # a generated identifier
    params = {k: v for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items() if v is not None}
    params.pop("dbname", None)
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
    try:
        yield f"postgresql:///{name}?{query}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def main() -> None:
    """Run both backends and print a small table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("RELAY_TEST_POSTGRES_DSN")
        or "postgresql://postgres@127.0.0.1:5432/postgres",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    cards = generated_cards(args.cards)
    print(f"{args.cards} cards, batches of {args.batch}")
    with tempfile.TemporaryDirectory() as directory:
        sqlite_url = f"sqlite:///{Path(directory) / 'vault.db'}"
        created, rerun = await import_rate(
            vault_config(sqlite_url, Path(directory)), cards, args.batch
        )
        print(f"sqlite      created {created:8.0f} cards/s   re-run {rerun:8.0f} cards/s")
        with throwaway_database(args.postgres) as url:
            created, rerun = await import_rate(
                vault_config(url, Path(directory)), cards, args.batch
            )
        print(f"postgresql  created {created:8.0f} cards/s   re-run {rerun:8.0f} cards/s")


if __name__ == "__main__":
    asyncio.run(main())
