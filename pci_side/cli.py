"""`relay pci serve`: the PciRelay worker as a process.

Settings come from RELAY_PCI_*, RELAY_VAULT_* and RELAY_FLEX_* (secrets from *_FILE paths);
plaintext gRPC needs the explicit --insecure-dev flag and is for a developer's loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os

import structlog

from pci_side.ratelimit import RateLimiter
from pci_side.server import PciRelayService
from pci_side.tokenize import Tokenizer
from pci_side.vault import open_vault
from relay.config import PciConfig, PciSettings
from relay.flex.client import FlexClient, new_http_client
from relay.logging import configure_logging
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.serving import new_server, start_server

SERVICE_NAME = pci_relay_pb2.DESCRIPTOR.services_by_name["PciRelay"].full_name


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `pci serve` to the relay command."""
    pci = commands.add_parser("pci", help="the PCI side: the PciRelay tokenization worker")
    actions = pci.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve PciRelay until SIGTERM")
    serve.add_argument("--host", help="overrides RELAY_PCI_HOST")
    serve.add_argument("--port", type=int, help="overrides RELAY_PCI_PORT (0 picks a free port)")
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="plaintext gRPC, merchant id from x-relay-merchant-id metadata: local use only",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = PciSettings.from_env(os.environ, insecure_dev=args.insecure_dev)
    configure_logging(level=settings.log_level)
    server = settings.pci.server
    server = dataclasses.replace(
        server,
        host=args.host if args.host is not None else server.host,
        port=args.port if args.port is not None else server.port,
    )
    asyncio.run(run(dataclasses.replace(settings.pci, server=server)))
    return 0


async def run(config: PciConfig) -> None:
    """Open the vault and the Flex client, serve until a signal, then drain and close."""
    log = structlog.get_logger("pci_side")
    async with await open_vault(config.vault) as vault, new_http_client(config.flex) as http:
        tokenizer = Tokenizer(
            vault,
            FlexClient(http, config.flex),
            RateLimiter(config.rate_per_second, config.rate_burst),
        )
        service = PciRelayService(
            tokenizer,
            concurrency=config.stream_concurrency,
            insecure_dev=config.server.insecure_dev,
        )
        served = await start_server(
            new_server(),
            config.server,
            [SERVICE_NAME],
            register=lambda s: pci_relay_pb2_grpc.add_PciRelayServicer_to_server(service, s),
        )
        served.install_signal_handlers()
        if config.server.insecure_dev:
            log.warning("pci_insecure_dev", detail="plaintext gRPC; never outside loopback")
        log.info("pci_listening", host=config.server.host, port=served.port)
        await served.stopping.wait()
        log.info("pci_draining", grace_seconds=config.server.drain_seconds)
        await served.drain(config.server.drain_seconds)
    log.info("pci_stopped")
