"""`relay pci serve`: the PciRelay worker as a process.

Settings come from RELAY_PCI_*, RELAY_VAULT_* and RELAY_FLEX_* (secrets from *_FILE paths);
plaintext gRPC needs the explicit --insecure-dev flag and is for a developer's loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import os
from collections.abc import AsyncIterator
from importlib import resources

from relay.ratelimit import RateLimiter
from pci_side.server import PciRelayService
from pci_side.tokenize import Tokenizer
from pci_side.vault import NewCard, open_vault
from relay.cards import CardData, Pan, SecurityCode
from relay.config import PciConfig, PciSettings, VaultSettings
from relay.flex.client import FlexClient, new_http_client
from relay.logging import configure_logging
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.serving import (
    Served,
    add_serve_arguments,
    new_server,
    serve_until_signal,
    start_server,
    with_overrides,
)

SERVICE_NAME = pci_relay_pb2.DESCRIPTOR.services_by_name["PciRelay"].full_name


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `pci serve` to the relay command."""
    pci = commands.add_parser("pci", help="the PCI side: the PciRelay tokenization worker")
    actions = pci.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve PciRelay until SIGTERM")
    add_serve_arguments(
        serve,
        "RELAY_PCI",
        "plaintext gRPC, merchant id from x-relay-merchant-id metadata: local use only",
    )
    serve.set_defaults(func=_serve)
    seed = actions.add_parser(
        "seed-demo", help="load the standard public test cards into the vault (demo only)"
    )
    seed.add_argument("--merchant", required=True, help="the merchant id granted every card")
    seed.set_defaults(func=_seed_demo)


def _seed_demo(args: argparse.Namespace) -> int:
    """Import the packaged demo cards; print one JSON line per card_ref (masked data only)."""
    settings = VaultSettings.from_env(os.environ)
    configure_logging(level=settings.log_level)
    refs = asyncio.run(seed_demo_cards(settings, args.merchant))
    for card_ref, masked, card_type in refs:
        print(json.dumps({"card_ref": card_ref, "masked_pan": masked, "type": card_type}))  # noqa: T201
    return 0


async def seed_demo_cards(settings: VaultSettings, merchant: str) -> list[tuple[str, str, str]]:
    """The public test cards of several networks, granted to one merchant; idempotent."""
    source = resources.files("pci_side").joinpath("demo_cards.csv").read_text(encoding="utf-8")
    cards = [
        NewCard(
            row["card_ref"],
            CardData(
                Pan(row["pan"]),
                int(row["exp_month"]),
                int(row["exp_year"]),
                SecurityCode(row["cvv"]),
                row["type"],
            ),
            (merchant,),
        )
        for row in csv.DictReader(io.StringIO(source))
    ]
    async with await open_vault(settings.vault) as vault:
        await vault.import_cards(cards)
    return [(c.card_ref, c.card.pan.masked, c.card.card_type or "") for c in cards]


def _serve(args: argparse.Namespace) -> int:
    settings = PciSettings.from_env(os.environ, insecure_dev=args.insecure_dev)
    configure_logging(level=settings.log_level)
    config = settings.pci
    config = dataclasses.replace(config, server=with_overrides(config.server, args.host, args.port))
    asyncio.run(serve_until_signal(running(config), config.server, "pci"))
    return 0


@contextlib.asynccontextmanager
async def running(config: PciConfig) -> AsyncIterator[Served]:
    """A started PciRelay server with its vault and Flex client; closed on exit.

    On the way out, attempts whose card is already on its way to Flex finish (their outcome
    is audited) before the vault closes.
    """
    async with await open_vault(config.vault) as vault, new_http_client(config.flex) as http:
        tokenizer = Tokenizer(
            vault,
            FlexClient(http, config.flex),
            RateLimiter(config.rate_per_second, config.rate_burst),
        )
        draining = asyncio.Event()
        service = PciRelayService(
            tokenizer,
            concurrency=config.stream_concurrency,
            insecure_dev=config.server.insecure_dev,
            draining=draining,
        )
        served = await start_server(
            new_server(),
            config.server,
            [SERVICE_NAME],
            register=lambda s: pci_relay_pb2_grpc.add_PciRelayServicer_to_server(service, s),  # type: ignore[no-untyped-call]
        )
        served.draining = draining
        try:
            yield served
        finally:
            await served.close()
            await tokenizer.drain()
