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

import structlog

from pci_side.presence import Presence, new_instance_id
from pci_side.server import PciRelayService
from pci_side.tokenize import Tokenizer
from pci_side.vault import CardVault, NewCard, open_vault
from relay import rpc
from relay.cards import CardData, Pan, SecurityCode
from relay.config import PciConfig, PciSettings, VaultSettings
from relay.errors import ConfigError
from relay.flex.client import FlexClient, new_http_client
from relay.logging import configure_logging
from relay.pb.v1 import pci_relay_pb2
from relay.ratelimit import Rate
from relay.receipts import ReceiptSigner, generate_receipt_key
from relay.secrets import read_secret_file
from relay.serving import (
    Served,
    add_serve_arguments,
    new_server,
    serve_until_signal,
    start_server,
    with_overrides,
)

SERVICE = pci_relay_pb2.DESCRIPTOR.services_by_name["PciRelay"]
SERVICE_NAME = SERVICE.full_name
_log = structlog.get_logger("pci_side.cli")


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
    _register_receipt_key(actions)


def _register_receipt_key(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pci receipt-key generate|public`: the Ed25519 key that signs release receipts."""
    receipt_key = actions.add_parser("receipt-key", help="the key that signs release receipts")
    steps = receipt_key.add_subparsers(dest="step", required=True)
    generate = steps.add_parser(
        "generate", help="write a new Ed25519 private key (PEM, mode 0600) for the PCI side"
    )
    generate.add_argument("--out", required=True, help="the file to create; never overwritten")
    generate.set_defaults(func=_generate_receipt_key)
    public = steps.add_parser(
        "public", help="print the public key (PEM) that merchant apps verify receipts with"
    )
    public.add_argument("--key", required=True, help="the private key file")
    public.set_defaults(func=_print_receipt_public_key)


def _generate_receipt_key(args: argparse.Namespace) -> int:
    """Create the key file with mode 0600 from the start; refuse to replace an existing file."""
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        message = f"{args.out} already exists: receipt keys are never overwritten"
        raise ConfigError([message]) from None
    except OSError:
        raise ConfigError([f"{args.out} cannot be created"]) from None
    with os.fdopen(fd, "wb") as out:
        out.write(generate_receipt_key())
    return 0


def _print_receipt_public_key(args: argparse.Namespace) -> int:
    """Print the public half of the key file: safe to hand to every merchant."""
    try:
        signer = ReceiptSigner(read_secret_file(args.key, "--key"))
    except ValueError:
        raise ConfigError([f"{args.key} does not hold an Ed25519 private key in PEM"]) from None
    print(signer.public_pem().decode("ascii"), end="")  # noqa: T201  the command's output
    return 0


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
        presence = Presence(vault, new_instance_id())
        tokenizer = Tokenizer(
            vault,
            FlexClient(http, config.flex),
            Rate(config.rate_per_second, config.rate_burst),
            receipts=ReceiptSigner(config.receipt_key.get_secret_value()),
            presence=presence,
        )
        # Beating before serving: a context this process claims is never held by the silent.
        async with presence:
            draining = asyncio.Event()
            service = PciRelayService(
                tokenizer,
                record_refusal=vault.record_refusal,
                concurrency=config.stream_concurrency,
                insecure_dev=config.server.insecure_dev,
                draining=draining,
            )
            served = await start_server(
                new_server(),
                config.server,
                [SERVICE_NAME],
                register=lambda s: rpc.add_service(
                    s, service, SERVICE, on_unparseable=service.unparseable
                ),
            )
            served.draining = draining
            sweeper = asyncio.create_task(sweep_security_codes(vault), name="cvv-sweep")
            try:
                yield served
            finally:
                sweeper.cancel()
                await asyncio.wait([sweeper])
                await served.close()
                await tokenizer.drain()  # before leaving: nothing of ours is in flight


async def sweep_security_codes(vault: CardVault) -> None:
    """Delete expired CVVs at start, then every sweep interval, until cancelled.

    A failed sweep is logged and the next one tries again: the worker keeps serving.
    """
    interval = vault.cvv_retention.sweep_interval
    while True:
        try:
            await vault.purge_expired_security_codes()
        except Exception as exc:  # noqa: BLE001  logged by type only: a message may quote values
            _log.error("vault_cvv_purge_failed", error=type(exc).__name__)
        await asyncio.sleep(interval)
