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
from merchant_side.ledger import open_ledger
from merchant_side.pci_client import PciClient, open_channel
from merchant_side.server import MerchantGatewayService
from relay.config import MerchantConfig, MerchantSettings
from relay.flex.client import FlexClient, new_http_client
from relay.logging import configure_logging
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc
from relay.serving import Served, new_server, start_server

SERVICE_NAME = merchant_gateway_pb2.DESCRIPTOR.services_by_name["MerchantGateway"].full_name


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `merchant serve` to the relay command."""
    merchant = commands.add_parser("merchant", help="the merchant side: the MerchantGateway")
    actions = merchant.add_subparsers(dest="action", required=True)
    serve = actions.add_parser("serve", help="serve MerchantGateway until SIGTERM")
    serve.add_argument("--host", help="overrides RELAY_MERCHANT_HOST")
    serve.add_argument("--port", type=int, help="overrides RELAY_MERCHANT_PORT (0: a free port)")
    serve.add_argument(
        "--insecure-dev",
        action="store_true",
        help="plaintext gRPC to callers and to PciRelay: local use only",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    settings = MerchantSettings.from_env(os.environ, insecure_dev=args.insecure_dev)
    configure_logging(level=settings.log_level)
    server = settings.merchant.server
    server = dataclasses.replace(
        server,
        host=args.host if args.host is not None else server.host,
        port=args.port if args.port is not None else server.port,
    )
    asyncio.run(run(dataclasses.replace(settings.merchant, server=server)))
    return 0


async def run(config: MerchantConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and close."""
    log = structlog.get_logger("merchant_side")
    async with running(config) as served:
        served.install_signal_handlers()
        if config.server.insecure_dev:
            log.warning("merchant_insecure_dev", detail="plaintext gRPC; never outside loopback")
        log.info("merchant_listening", host=config.server.host, port=served.port)
        await served.stopping.wait()
        log.info("merchant_draining", grace_seconds=config.server.drain_seconds)
        await served.drain(config.server.drain_seconds)
    log.info("merchant_stopped")


@contextlib.asynccontextmanager
async def running(config: MerchantConfig) -> AsyncIterator[Served]:
    """A started MerchantGateway with its ledger, Flex client and PciRelay channel."""
    ledger = await open_ledger(config.ledger_url)
    try:
        async with new_http_client(config.flex) as http, open_channel(config.pci) as channel:
            gateway = Gateway(FlexClient(http, config.flex), ledger, config)
            service = MerchantGatewayService(
                gateway, PciClient(channel, config.pci), bulk_concurrency=config.bulk_concurrency
            )
            served = await start_server(
                new_server(),
                config.server,
                [SERVICE_NAME],
                register=lambda s: merchant_gateway_pb2_grpc.add_MerchantGatewayServicer_to_server(  # type: ignore[no-untyped-call]
                    service, s
                ),
            )
            try:
                yield served
            finally:
                await served.server.stop(None)
    finally:
        await ledger.close()
