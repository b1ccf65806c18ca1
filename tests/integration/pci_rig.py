"""A running three-piece rig: Flex simulator, card vault and PciRelay over mutual TLS.

A test module takes the fixtures by assigning them to module names (pytest finds fixtures by
name; an assignment rather than an import keeps ruff's F811 quiet where a test names one)::

    from tests.integration import pci_rig as rig_fixtures

    pci_pki, pci_flexsim, make_pci_rig, pci_rig = (
        rig_fixtures.pci_pki,
        rig_fixtures.pci_flexsim,
        rig_fixtures.make_pci_rig,
        rig_fixtures.pci_rig,
    )

The fixtures:

- ``pci_pki`` (session): a test CA, a server certificate for localhost and 127.0.0.1, and
  client certificates minted per merchant on demand (``pci_pki.client("m-alpha")``); a second,
  unknown CA is one ``relay.dev.tlsgen.new_ca()`` away.
- ``pci_flexsim`` (module): a simulator with a one-time key pool of 256, so that a test asking
  for hundreds of capture contexts finds most of them ready.
- ``make_pci_rig`` (function): ``await make_pci_rig(sim, **settings)`` starts a PciRelay in the
  test's event loop with ``pci_side.cli.running`` (the code `relay pci serve` runs), on a fresh
  SQLite vault seeded with ``SEEDED_CARDS``; everything it started is closed after the test.
- ``pci_rig`` (function): ``make_pci_rig(pci_flexsim)`` with the default settings.

A ``PciRig`` gives channels and stubs per merchant (the merchant is named by the client
certificate), the vault (for the audit log), and ``flex``: a FlexClient with the simulator's
credentials that creates and verifies capture contexts and verifies transient tokens exactly
as the merchant side does. With ``tap=True`` the worker and ``flex`` reach the simulator
through a ``FlexTap``, which records every HTTP request and how many were in flight at once:
the worker builds its own httpx client, so the tap is where a test sees the worker's Flex calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from pci_side.cli import running
from pci_side.vault import CardVault, NewCard, open_vault
from relay.cards import AMEX, CardData, Pan, SecurityCode
from relay.config import FlexConfig, PciConfig, ServerConfig, VaultConfig
from relay.dev import tlsgen
from relay.flex.client import FlexClient, new_http_client
from relay.flex.fields import DEFAULT_FIELDS, FieldSpec
from relay.flex.models import CaptureContext
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.receipts import ReceiptSigner, generate_receipt_key
from relay.secrets import Secret
from relay.serving import Served
from tests.cards_testdata import TEST_CARDS, CardVector, assert_no_test_pans
from tests.integration.conftest import CONTEXT_TTL, FlexSim, expiry_year, module_flexsim
from tests.vault_backends import make_vault_config, vault_env

MERCHANT = "m-alpha"
OTHER_MERCHANT = "m-beta"
MERCHANT_METADATA_KEY = "x-relay-merchant-id"
SERVICE_NAME = "relay.pb.v1.PciRelay"


@dataclasses.dataclass(frozen=True, repr=False)
class SeededCard:
    """A test card as the rig's vault holds it: its card_ref, the vector, the CVV and grants."""

    card_ref: str
    vector: CardVector
    security_code: str | None
    merchants: tuple[str, ...]

    def __repr__(self) -> str:
        """Name the card by card_ref only (the vector's repr is masked too)."""
        return f"SeededCard({self.card_ref})"

    def card_data(self) -> CardData:
        """The CardData imported into the vault."""
        code = SecurityCode(self.security_code) if self.security_code else None
        return CardData(Pan(self.vector.digits), 12, expiry_year(), code)


def _first(network: str) -> CardVector:
    return next(card for card in TEST_CARDS if card.network == network)


def _granted(card_ref: str, vector: CardVector, merchants: tuple[str, ...]) -> SeededCard:
    return SeededCard(card_ref, vector, "1234" if vector.card_type == AMEX else "123", merchants)


NETWORK_CARDS: tuple[SeededCard, ...] = tuple(
    _granted(card_ref, _first(network), (MERCHANT,))
    for card_ref, network in (
        ("card-visa", "Visa"),
        ("card-mastercard", "Mastercard"),
        ("card-amex", "American Express"),
        ("card-discover", "Discover"),
        ("card-diners", "Diners Club"),
        ("card-jcb", "JCB"),
        ("card-maestro", "Maestro"),
        ("card-unionpay", "UnionPay"),
    )
)
"""One card per network, each granted to MERCHANT only."""

BETA_ONLY = _granted("card-beta-only", _first("Mastercard 2-series"), (OTHER_MERCHANT,))
"""A card granted to OTHER_MERCHANT only: MERCHANT must not be able to tell it exists."""

NO_CVV = SeededCard("card-no-cvv", _first("Visa debit"), None, (MERCHANT,))
"""A card stored without a security code, granted to MERCHANT."""

SEEDED_CARDS: tuple[SeededCard, ...] = (*NETWORK_CARDS, BETA_ONLY, NO_CVV)
UNKNOWN_CARD_REF = "card-never-imported"


async def seed_vault(vault: CardVault) -> None:
    """Import SEEDED_CARDS with their grants."""
    await vault.import_cards(
        [NewCard(card.card_ref, card.card_data(), card.merchants) for card in SEEDED_CARDS]
    )


# --- PKI ----------------------------------------------------------------------------------------


class RigPKI:
    """A test CA, the server's certificate, and client certificates per merchant, on disk."""

    def __init__(self, directory: Path) -> None:
        """Make the CA and the server certificate and write them (and the CA) to directory."""
        self.directory = directory
        self.ca = tlsgen.new_ca("pci rig CA")
        self.server = tlsgen.issue_server(self.ca, ("localhost", "127.0.0.1"))
        self.ca_file = directory / "ca.crt"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.server_cert_file, self.server_key_file = self.server.write(directory, "server")
        self._clients: dict[str, tlsgen.Issued] = {}

    def client(self, merchant: str) -> tlsgen.Issued:
        """The client certificate naming merchant, issued by the rig's CA (made once)."""
        if merchant not in self._clients:
            self._clients[merchant] = tlsgen.issue_client(self.ca, merchant)
        return self._clients[merchant]

    def credentials(
        self, merchant: str | None = MERCHANT, *, client: tlsgen.Issued | None = None
    ) -> grpc.ChannelCredentials:
        """Channel credentials trusting the rig's CA, with merchant's (or client's) cert.

        merchant=None and no client: no client certificate at all.
        """
        if client is None and merchant is not None:
            client = self.client(merchant)
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem)
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem,
            private_key=client.key_pem,
            certificate_chain=client.cert_pem,
        )

    def server_config(self, **overrides: Any) -> ServerConfig:
        """A loopback, port-0 ServerConfig requiring client certificates from this CA."""
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "tls_cert_file": str(self.server_cert_file),
            "tls_key_file": str(self.server_key_file),
            "client_ca_file": str(self.ca_file),
            "drain_seconds": 2.0,
        }
        return ServerConfig(**(values | overrides))

    def server_env(self) -> dict[str, str]:
        """The RELAY_PCI_* TLS variables naming the same files, for `relay pci serve`."""
        return {
            "RELAY_PCI_TLS_CERT_FILE": str(self.server_cert_file),
            "RELAY_PCI_TLS_KEY_FILE": str(self.server_key_file),
            "RELAY_PCI_CLIENT_CA_FILE": str(self.ca_file),
        }


# --- The Flex tap ------------------------------------------------------------------------------


@dataclasses.dataclass
class _TapConnection:
    buffer: bytes = b""
    body_left: int = 0
    waiting_path: str | None = None


class FlexTap:
    """A loopback TCP relay in front of a simulator that notes the HTTP requests it passes on.

    httpx speaks HTTP/1.1 without pipelining, so on one connection a request is in flight from
    its request line until the first byte of the answer; the tap counts, per path, the requests
    seen and the most in flight at once. Bytes pass through unchanged: the Host header (which
    the simulator turns into flx.origin and HTTP Signature covers) names the tap.
    """

    def __init__(self, upstream_url: str) -> None:
        """Relay to the simulator at upstream_url once started."""
        parts = urllib.parse.urlsplit(upstream_url)
        assert parts.hostname is not None
        assert parts.port is not None
        self._upstream = (parts.hostname, parts.port)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening, cut every relayed connection, and wait until each is closed."""
        if self._server is not None:
            self._server.close()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def count(self, method: str, path: str) -> int:
        """How many requests with this method and path went through."""
        return self.requests.count((method, path))

    def reset(self) -> None:
        """Forget what was seen so far (requests still in flight stay counted)."""
        self.requests.clear()
        self.peak = Counter(self.in_flight)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            with contextlib.suppress(OSError):
                await self._relay(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._handlers.discard(handler)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        connection = _TapConnection()
        pumps = {
            asyncio.create_task(self._requests(reader, up_writer, connection)),
            asyncio.create_task(self._responses(up_reader, writer, connection)),
        }
        self._pumps |= pumps
        try:
            # Either side closing (or close() cancelling a pump) ends the relay.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            self._answered(connection)
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, connection: _TapConnection
    ) -> None:
        while data := await reader.read(65536):
            # Noted before the bytes are forwarded, so the answer cannot overtake the count.
            connection.buffer += data
            self._note_requests(connection)
            up.write(data)
            await up.drain()

    async def _responses(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _TapConnection
    ) -> None:
        while data := await up.read(65536):
            self._answered(connection)
            writer.write(data)
            await writer.drain()

    def _note_requests(self, connection: _TapConnection) -> None:
        while True:
            if connection.body_left:
                taken = min(connection.body_left, len(connection.buffer))
                connection.body_left -= taken
                connection.buffer = connection.buffer[taken:]
                if connection.body_left:
                    return
            head, found, rest = connection.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = dict(line.lower().split(":", 1) for line in header_lines if ":" in line)
            path = urllib.parse.urlsplit(target).path
            self.requests.append((method, path))
            self.in_flight[path] += 1
            self.peak[path] = max(self.peak[path], self.in_flight[path])
            connection.waiting_path = path
            connection.buffer = rest
            connection.body_left = int(headers.get("content-length", "0").strip() or 0)

    def _answered(self, connection: _TapConnection) -> None:
        if connection.waiting_path is not None:
            self.in_flight[connection.waiting_path] -= 1
            connection.waiting_path = None


# --- The rig ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PciRig:
    """A started PciRelay with its vault, the simulator behind it, and a merchant's view."""

    served: Served
    config: PciConfig
    vault: CardVault
    """A second handle on the worker's vault (the worker opens its own): audit, grants."""
    flex: FlexClient
    """The merchant side's Flex client: creates capture contexts, verifies CCs and TTs."""
    pki: RigPKI
    sim: FlexSim
    tap: FlexTap | None
    _stack: contextlib.AsyncExitStack
    _request_ids: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    @property
    def receipt_public_key(self) -> bytes:
        """The worker's receipt public key (PEM), what merchant apps verify receipts with."""
        return ReceiptSigner(self.config.receipt_key.get_secret_value()).public_pem()

    @property
    def port(self) -> int:
        """The worker's port on 127.0.0.1."""
        return self.served.port

    @property
    def target(self) -> str:
        """host:port to dial."""
        return f"127.0.0.1:{self.port}"

    def channel(
        self,
        merchant: str | None = MERCHANT,
        *,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> grpc.aio.Channel:
        """A channel to the worker, closed with the rig.

        Over mTLS with merchant's certificate (or the given credentials); over plaintext if the
        worker runs with insecure_dev, where each call names its merchant in the
        MERCHANT_METADATA_KEY metadata instead.
        """
        if self.config.server.insecure_dev:
            channel = grpc.aio.insecure_channel(self.target)
        else:
            channel = grpc.aio.secure_channel(
                self.target, credentials or self.pki.credentials(merchant)
            )
        self._stack.push_async_callback(channel.close, None)
        return channel

    def stub(self, merchant: str | None = MERCHANT) -> pci_relay_pb2_grpc.PciRelayStub:
        """A PciRelay stub on a new channel for merchant."""
        return pci_relay_pb2_grpc.PciRelayStub(self.channel(merchant))

    async def context(
        self, fields: tuple[FieldSpec, ...] = DEFAULT_FIELDS
    ) -> tuple[str, CaptureContext]:
        """A fresh capture context from the simulator, raw and as the merchant side verified it."""
        raw = await self.flex.create_session(fields)
        return raw, await self.flex.verify_capture_context(raw)

    async def contexts(
        self, count: int, fields: tuple[FieldSpec, ...] = DEFAULT_FIELDS
    ) -> list[tuple[str, CaptureContext]]:
        """count fresh capture contexts, created concurrently."""
        return list(await asyncio.gather(*(self.context(fields) for _ in range(count))))

    def request(
        self, card_ref: str, capture_context: str, request_id: str | None = None
    ) -> pci_relay_pb2.PciTokenizeRequest:
        """A PciTokenizeRequest with a request_id unique within the rig unless given."""
        return pci_relay_pb2.PciTokenizeRequest(
            request_id=request_id or f"req-{next(self._request_ids):04d}",
            capture_context=capture_context,
            card_ref=card_ref,
        )


class MakePciRig(Protocol):
    """Start a rig; every setting has a default fit for most tests."""

    async def __call__(  # noqa: PLR0913  the rig's knobs, all keyword-only
        self,
        sim: FlexSim | None = None,
        *,
        tap: bool = False,
        insecure_dev: bool = False,
        allowed_origins: frozenset[str] = frozenset(),
        rate_per_second: float = 1000.0,
        rate_burst: int = 1000,
        stream_concurrency: int = 32,
        vault_config: VaultConfig | None = None,
    ) -> PciRig:
        """Start it; the fixture stops it after the test."""
        ...


@contextlib.asynccontextmanager
async def start_pci_rig(  # noqa: PLR0913  the rig's knobs, all keyword-only
    sim: FlexSim,
    pki: RigPKI,
    directory: Path,
    *,
    tap: bool = False,
    insecure_dev: bool = False,
    allowed_origins: frozenset[str] = frozenset(),
    rate_per_second: float = 1000.0,
    rate_burst: int = 1000,
    stream_concurrency: int = 32,
    vault_config: VaultConfig | None = None,
) -> AsyncIterator[PciRig]:
    """A PciRelay on a freshly seeded vault (SQLite unless given one), in front of sim.

    Stopped on exit. Rigs given one vault_config are replicas of one PciRelay: their own
    processes' worth of state over one database. The default rate limit is high on purpose: a
    test of the rate limit asks for its own.
    """
    async with contextlib.AsyncExitStack() as stack:
        flex_tap = None
        base_url = sim.url
        if tap:
            flex_tap = FlexTap(sim.url)
            await flex_tap.start()
            stack.push_async_callback(flex_tap.close)
            base_url = flex_tap.url
        merchant_config = sim.config(base_url=base_url)
        http = await stack.enter_async_context(new_http_client(merchant_config))
        if vault_config is None:
            vault_config = make_vault_config(f"sqlite:///{directory / 'vault.db'}", directory)
        vault = await stack.enter_async_context(await open_vault(vault_config))
        await seed_vault(vault)
        server = (
            ServerConfig(host="127.0.0.1", port=0, insecure_dev=True, drain_seconds=2.0)
            if insecure_dev
            else pki.server_config()
        )
        config = PciConfig(
            server=server,
            flex=FlexConfig(base_url=base_url, allowed_origins=allowed_origins),
            vault=vault_config,
            receipt_key=Secret(write_receipt_key(directory).read_bytes()),
            rate_per_second=rate_per_second,
            rate_burst=rate_burst,
            stream_concurrency=stream_concurrency,
        )
        served = await stack.enter_async_context(running(config))
        yield PciRig(
            served, config, vault, FlexClient(http, merchant_config), pki, sim, flex_tap, stack
        )


pci_flexsim = module_flexsim("--context-ttl", str(CONTEXT_TTL), "--pool-size", "256")


@pytest.fixture(scope="session")
def pci_pki(tmp_path_factory: pytest.TempPathFactory) -> RigPKI:
    """One test PKI for the session."""
    return RigPKI(tmp_path_factory.mktemp("pci-pki"))


@pytest.fixture
async def make_pci_rig(
    pci_flexsim: FlexSim, pci_pki: RigPKI, tmp_path: Path
) -> AsyncIterator[MakePciRig]:
    """Start rigs (on pci_flexsim unless told otherwise); all are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:
        made = itertools.count()

        async def make(sim: FlexSim | None = None, **settings: Any) -> PciRig:
            directory = tmp_path / f"rig-{next(made)}"
            directory.mkdir()
            return await stack.enter_async_context(
                start_pci_rig(sim or pci_flexsim, pci_pki, directory, **settings)
            )

        yield make


@pytest.fixture
async def pci_rig(make_pci_rig: MakePciRig) -> PciRig:
    """The default rig: PciRelay over mTLS on pci_flexsim."""
    return await make_pci_rig()


# --- Checking failures --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rejection:
    """What a caller sees of a failed call: code, details and trailing metadata."""

    code: grpc.StatusCode
    details: str
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError) -> Rejection:
        """Read a failed call, after checking that none of it holds a test PAN."""
        metadata = tuple(
            (key, value) for key, value in (exc.trailing_metadata() or ()) if isinstance(value, str)
        )
        rejection = cls(exc.code(), exc.details() or "", metadata)
        text = "\n\n\n".join(
            [str(rejection.code), rejection.details, repr(metadata), exc.debug_error_string() or ""]
        )
        assert_no_test_pans(text, "a gRPC failure")
        return rejection

    @property
    def reason(self) -> str:
        """The relay-reason trailing metadata, or "" when the failure did not come from relay."""
        return dict(self.metadata).get("relay-reason", "")


def write_receipt_key(directory: Path) -> Path:
    """A receipt signing key file in directory (mode 0600), made once and then reused."""
    path = directory / "receipt.key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_bytes(generate_receipt_key())
    return path


def pci_serve_env(
    sim: FlexSim, pki: RigPKI, vault_config: VaultConfig, directory: Path
) -> dict[str, str]:
    """The environment of a `relay pci serve` child on a free port in front of sim.

    Starts from this process's environment without any RELAY_* variable, so nothing leaks in.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    return env | {
        "RELAY_PCI_HOST": "127.0.0.1",
        "RELAY_PCI_PORT": "0",
        "RELAY_PCI_DRAIN_SECONDS": "2",
        "RELAY_FLEX_BASE_URL": sim.url,
        "RELAY_LOG_LEVEL": "info",
        "RELAY_PCI_RECEIPT_KEY_FILE": str(write_receipt_key(directory)),
        **pki.server_env(),
        **vault_env(vault_config, directory),
    }
