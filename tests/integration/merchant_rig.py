"""The full three-party rig in one event loop: simulator + PciRelay + MerchantGateway, mTLS.

The simulator is a child process (`relay flexsim serve`); PciRelay and the MerchantGateway run
in the test's event loop through the code their `serve` commands run (`pci_side.cli.running`,
`merchant_side.cli.running`), each on 127.0.0.1 port 0 with certificates from relay.dev.tlsgen. A
test talks to the gateway as a merchant app does, through `relay.client.MerchantClient`.
A test module takes the fixtures by assigning them to module names::

    from tests.integration import merchant_rig as rig_fixtures

    merchant_pki, merchant_flexsim, make_merchant_rig = (
        rig_fixtures.merchant_pki,
        rig_fixtures.merchant_flexsim,
        rig_fixtures.make_merchant_rig,
    )

The fixtures:

- ``merchant_pki`` (session): the PCI rig's test PKI (one CA, one server certificate for
  localhost and 127.0.0.1, used by both servers) plus client certificate files on disk: the
  merchant's (``MERCHANT``, which PciRelay reads as the caller) and merchant apps' (``APP``,
  ``OTHER_APP``: SAN URI ``urn:relay:app:<id>``, which the gateway reads as the caller).
- ``merchant_flexsim`` (module): a simulator whose one-time key pool holds ``POOL_SIZE`` keys,
  enough for a 500-request bulk stream. RSA-2048 keys are made at about 24 a second, so the pool
  fills in the background while the module's earlier tests run; a test that drains it still
  works, at the keygen rate.
- ``make_merchant_rig`` (function): ``await make_merchant_rig(sim, **settings)`` starts a
  PciRelay (on a fresh SQLite vault seeded with the PCI rig's ``SEEDED_CARDS``) and a gateway
  in front of it; with ``pci_target`` the gateway dials that address instead and no PciRelay is
  started; with ``pci_delay`` a ``SlowLink`` between the two holds the first connection's bytes
  that long. Everything is stopped after the test.
- ``postgres_ledger_url`` (function): a ledger DSN whose ``search_path`` is a fresh schema of the
  run's PostgreSQL database (tests/vault_backends.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from merchant_side.cli import running
from pci_side.vault import AuditEntry, CardVault
from relay.client import MerchantClient
from relay.config import MerchantConfig, PciClientConfig
from relay.dev import tlsgen
from relay.pb.v1 import merchant_gateway_pb2_grpc
from relay.secrets import Secret
from relay.serving import Served
from tests.integration.conftest import CONTEXT_TTL, FlexSim, module_flexsim
from tests.integration.pci_rig import MERCHANT, PciRig, RigPKI, start_pci_rig
from tests.vault_backends import postgres_schema

APP = "shop-app"
"""The merchant app calling the gateway: its client certificate names it."""
OTHER_APP = "other-app"
"""A second app of the same merchant: its requests and tokens are its own."""
GATEWAY_SERVICE = "relay.pb.v1.MerchantGateway"
POOL_SIZE = 600
"""One-time keys the module's simulator keeps ready: a 500-request stream and some to spare."""
AUDIT_PAGE = 10_000


class MerchantPKI(RigPKI):
    """The PCI rig's PKI, its client certificates also written to files (a gateway reads files)."""

    def __init__(self, directory: Path) -> None:
        """Make the CA and the server certificate; client files are written on demand."""
        super().__init__(directory)
        self._files: dict[str, tuple[Path, Path]] = {}
        self._apps: dict[str, tlsgen.Issued] = {}
        self._app_files: dict[str, tuple[Path, Path]] = {}

    def client_files(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) files of the client certificate naming merchant name."""
        if name not in self._files:
            self._files[name] = self.client(name).write(self.directory, f"client-{name}")
        return self._files[name]

    def app(self, name: str) -> tlsgen.Issued:
        """The client certificate naming app name (made once)."""
        if name not in self._apps:
            self._apps[name] = tlsgen.issue_app(self.ca, name)
        return self._apps[name]

    def app_files(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) files of the client certificate naming app name."""
        if name not in self._app_files:
            self._app_files[name] = self.app(name).write(self.directory, f"app-{name}")
        return self._app_files[name]

    def pci_client_config(self, target: str, merchant: str = MERCHANT) -> PciClientConfig:
        """How a gateway of merchant reaches PciRelay at target: mutual TLS."""
        cert, key = self.client_files(merchant)
        return PciClientConfig(
            target=target, tls_cert_file=str(cert), tls_key_file=str(key), ca_file=str(self.ca_file)
        )

    def app_client(self, port: int, name: str = APP) -> MerchantClient:
        """A MerchantClient over mutual TLS to a gateway on 127.0.0.1:port, as app name."""
        cert, key = self.app_files(name)
        return MerchantClient.connect(
            f"127.0.0.1:{port}", ca_file=self.ca_file, cert_file=cert, key_file=key
        )

    def app_channel(
        self, port: int, name: str = APP, *, client: tlsgen.Issued | None = None
    ) -> grpc.aio.Channel:
        """A raw channel to the gateway as app name, or with client's certificate if given."""
        credentials = self.credentials(client=client or self.app(name))
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


# --- A TCP link that is slow to start -----------------------------------------------------------


class SlowLink:
    """A loopback TCP relay that holds the first connections' bytes before passing anything.

    Each of the first `slow_connections` accepted connections waits `delay` seconds before the
    relay reads from it or dials upstream, so whatever the caller sent first (for gRPC, the TLS
    ClientHello) sits in the socket buffer meanwhile; later connections pass at once.
    """

    def __init__(self, upstream: str, *, delay: float, slow_connections: int = 1) -> None:
        """Relay to upstream (host:port) once started."""
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._delay = delay
        self._slow = slow_connections
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.target = ""

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.target = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        index, self.accepted = self.accepted, self.accepted + 1
        try:
            if index < self._slow:
                await asyncio.sleep(self._delay)
            with contextlib.suppress(OSError):
                await self._relay(reader, writer)
        except asyncio.CancelledError:
            # close() cut it. Ending normally: Python 3.11's start_server callback calls
            # exception() on the handler task, which raises (and logs an error) if it was cancelled.
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(handler)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        pumps = {
            asyncio.create_task(_pump(reader, up_writer)),
            asyncio.create_task(_pump(up_reader, writer)),
        }
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """host:port where nothing listens: bound (so no one else takes it) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# --- The rig ------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunningGateway:
    """One started MerchantGateway (a replica) and the app client that calls it."""

    served: Served
    config: MerchantConfig
    client: MerchantClient

    @property
    def port(self) -> int:
        """The gateway's port on 127.0.0.1."""
        return self.served.port


@dataclasses.dataclass
class MerchantRig:
    """Simulator, PciRelay (unless the gateway was pointed elsewhere) and gateway replicas."""

    sim: FlexSim
    pci: PciRig | None
    pki: MerchantPKI
    link: SlowLink | None
    gateways: list[RunningGateway]
    _stack: contextlib.AsyncExitStack

    @property
    def gateway(self) -> RunningGateway:
        """The first gateway."""
        return self.gateways[0]

    @property
    def client(self) -> MerchantClient:
        """The merchant app's client of the first gateway."""
        return self.gateway.client

    @property
    def vault(self) -> CardVault:
        """A handle on the PCI side's vault (its audit log)."""
        assert self.pci is not None, "this rig has no PciRelay"
        return self.pci.vault

    def channel(
        self, gateway: int = 0, *, app: str = APP, client: tlsgen.Issued | None = None
    ) -> grpc.aio.Channel:
        """A raw channel to a gateway as app (or with client's certificate), closed with the rig."""
        channel = self.pki.app_channel(self.gateways[gateway].port, app, client=client)
        self._stack.push_async_callback(channel.close, None)
        return channel

    def stub(
        self, gateway: int = 0, *, app: str = APP, client: tlsgen.Issued | None = None
    ) -> merchant_gateway_pb2_grpc.MerchantGatewayStub:
        """A raw MerchantGateway stub on a new channel, as app (or with client's certificate)."""
        channel = self.channel(gateway, app=app, client=client)
        return merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)  # type: ignore[no-untyped-call]

    async def app_client(self, app: str, gateway: int = 0) -> MerchantClient:
        """Another app's MerchantClient of a gateway, closed with the rig."""
        client = self.pki.app_client(self.gateways[gateway].port, app)
        self._stack.push_async_callback(client.close)
        return client

    async def replica(self) -> RunningGateway:
        """Start another gateway with the first one's settings (same ledger, same PciRelay)."""
        config = dataclasses.replace(self.gateway.config)
        started = await self._stack.enter_async_context(start_gateway(config, self.pki))
        self.gateways.append(started)
        return started

    async def audit(self, request_id: str) -> list[AuditEntry]:
        """The PCI side's audit entries for request_id, oldest first."""
        stored = await self.vault.audit_entries(limit=AUDIT_PAGE)
        return [row.entry for row in reversed(stored) if row.entry.request_id == request_id]

    async def audit_outcomes(self, request_id: str) -> list[tuple[str, str]]:
        """(outcome, reason) of each audit entry for request_id, oldest first."""
        return [(entry.outcome, entry.reason) for entry in await self.audit(request_id)]


def gateway_config(
    sim: FlexSim, pki: MerchantPKI, pci_target: str, *, ledger_url: str, **settings: Any
) -> MerchantConfig:
    """A loopback, port-0 MerchantGateway config: mTLS both ways, Flex at sim."""
    values: dict[str, Any] = {
        "server": pki.server_config(),
        "flex": sim.config(),
        "pci": pki.pci_client_config(pci_target),
        "ledger_url": Secret(ledger_url),
    }
    return MerchantConfig(**(values | settings))


@contextlib.asynccontextmanager
async def start_gateway(config: MerchantConfig, pki: MerchantPKI) -> AsyncIterator[RunningGateway]:
    """A started gateway and an app client for it; both closed on exit."""
    async with running(config) as served:
        client = pki.app_client(served.port)
        try:
            yield RunningGateway(served, config, client)
        finally:
            await client.close()


class MakeMerchantRig(Protocol):
    """Start a rig; every setting has a default fit for most tests."""

    async def __call__(
        self,
        sim: FlexSim | None = None,
        *,
        pci_target: str | None = None,
        pci_delay: float = 0.0,
        ledger_url: str = "memory",
        **gateway_settings: Any,
    ) -> MerchantRig:
        """Start it; the fixture stops it after the test."""
        ...


@contextlib.asynccontextmanager
async def start_merchant_rig(  # noqa: PLR0913  the rig's knobs, all keyword-only after pki
    sim: FlexSim,
    pki: MerchantPKI,
    directory: Path,
    *,
    pci_target: str | None = None,
    pci_delay: float = 0.0,
    ledger_url: str = "memory",
    **gateway_settings: Any,
) -> AsyncIterator[MerchantRig]:
    """PciRelay (unless pci_target is given) and one gateway in front of sim; stopped on exit."""
    async with contextlib.AsyncExitStack() as stack:
        pci = None
        if pci_target is None:
            pci = await stack.enter_async_context(start_pci_rig(sim, pki, directory))
            pci_target = pci.target
        link = None
        if pci_delay:
            link = SlowLink(pci_target, delay=pci_delay)
            await link.start()
            stack.push_async_callback(link.close)
            pci_target = link.target
        config = gateway_config(sim, pki, pci_target, ledger_url=ledger_url, **gateway_settings)
        gateway = await stack.enter_async_context(start_gateway(config, pki))
        yield MerchantRig(sim, pci, pki, link, [gateway], stack)


merchant_flexsim = module_flexsim("--context-ttl", str(CONTEXT_TTL), "--pool-size", str(POOL_SIZE))


@pytest.fixture(scope="session")
def merchant_pki(tmp_path_factory: pytest.TempPathFactory) -> MerchantPKI:
    """One test PKI for the session."""
    return MerchantPKI(tmp_path_factory.mktemp("merchant-pki"))


@pytest.fixture
async def make_merchant_rig(
    merchant_flexsim: FlexSim, merchant_pki: MerchantPKI, tmp_path: Path
) -> AsyncIterator[MakeMerchantRig]:
    """Start rigs (on merchant_flexsim unless told otherwise); all are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:
        made = itertools.count()

        async def make(sim: FlexSim | None = None, **settings: Any) -> MerchantRig:
            directory = tmp_path / f"merchant-rig-{next(made)}"
            directory.mkdir()
            return await stack.enter_async_context(
                start_merchant_rig(sim or merchant_flexsim, merchant_pki, directory, **settings)
            )

        yield make


@pytest.fixture
def postgres_ledger_url(postgres_database: str) -> Iterator[str]:
    """A ledger DSN on a fresh schema of the run's PostgreSQL database (dropped after)."""
    with postgres_schema(postgres_database) as url:
        yield url
