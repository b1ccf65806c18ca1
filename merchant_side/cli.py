"""`relay merchant serve`: the MerchantGateway as a process.

Settings come from RELAY_MERCHANT_* and RELAY_FLEX_* (secrets from *_FILE paths); plaintext,
both towards merchant apps and towards PciRelay, needs the explicit --insecure-dev flag.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator

import structlog

from merchant_side.gateway import Gateway
from merchant_side.ledger import Ledger, open_ledger
from merchant_side.pci_client import PciClient, open_channel
from merchant_side.server import MerchantGatewayService
from relay import rpc
from relay.config import MerchantConfig, MerchantSettings
from relay.errors import RelayError
from relay.flex.client import FlexClient, new_http_client
from relay.logging import configure_logging
from relay.pb.v1 import merchant_gateway_pb2
from relay.ratelimit import RateLimiter
from relay.serving import (
    Served,
    add_serve_arguments,
    new_server,
    serve_until_signal,
    start_server,
    with_overrides,
)

SERVICE = merchant_gateway_pb2.DESCRIPTOR.services_by_name["MerchantGateway"]
SERVICE_NAME = SERVICE.full_name


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `merchant serve` to the relay command."""
    merchant = commands.add_parser("merchant", help="the merchant side: the MerchantGateway")
    actions = merchant.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve MerchantGateway until SIGTERM")
    add_serve_arguments(
        serve, "RELAY_MERCHANT", "plaintext gRPC to callers and to PciRelay: local use only"
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = MerchantSettings.from_env(os.environ, insecure_dev=args.insecure_dev)
    configure_logging(level=settings.log_level)
    config = settings.merchant
    config = dataclasses.replace(config, server=with_overrides(config.server, args.host, args.port))
    asyncio.run(serve_until_signal(running(config), config.server, "merchant"))
    return 0


@contextlib.asynccontextmanager
async def running(config: MerchantConfig) -> AsyncIterator[Served]:
    """A started MerchantGateway with its ledger, Flex client and PciRelay channel.

    On the way out, work that outlived its caller (answers still owed by PciRelay) is recorded
    in the ledger before the ledger closes.
    """
    ledger = await open_ledger(config.ledger_url)
    try:
        async with new_http_client(config.flex) as http, open_channel(config.pci) as channel:
            gateway = Gateway(FlexClient(http, config.flex), ledger, config)
            draining = asyncio.Event()
            service = MerchantGatewayService(
                gateway,
                PciClient(channel, config.pci),
                bulk_concurrency=config.bulk_concurrency,
                limiter=RateLimiter(config.app_rate, config.app_burst),
                insecure_dev=config.server.insecure_dev,
                draining=draining,
            )
            served = await start_server(
                new_server(),
                config.server,
                [SERVICE_NAME],
                register=lambda s: rpc.add_service(s, service, SERVICE),
            )
            served.draining = draining
            purger = asyncio.create_task(_purge_forever(ledger), name="ledger-purge")
            try:
                yield served
            finally:
                purger.cancel()
                await served.close()
                await gateway.wait_idle(config.server.drain_seconds)
    finally:
        await ledger.close()


async def _purge_forever(ledger: Ledger, every: float = 60.0) -> None:
    """Drop expired tokens and lapsed leases, so the ledger holds only live entries."""
    log = structlog.get_logger("merchant_side.ledger")
    while True:
        await asyncio.sleep(every)
        try:
            purged = await ledger.purge_expired()
        except RelayError as exc:
            log.warning("ledger_purge_failed", reason=exc.reason)
        else:
            log.debug("ledger_purged", entries=purged)
