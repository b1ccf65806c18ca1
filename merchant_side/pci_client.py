"""The merchant side's client of PciRelay: mutual TLS, errors rebuilt as RelayErrors.

Both ways to PciRelay are a `PciLink`: `PciClient` (one unary call per request) and
`PciStream`, which multiplexes many requests over one TokenizeStream call, correlated by
request_id. Each request carries its own timeout, after which PciRelay drops it unsent.

An answer from PciRelay is definite: a token, or an error under which nothing was tokenized. A
request that was sent but got no answer (the call or the stream died, or the answer took too
long) fails with OutcomeUnknown: PciRelay may have tokenized it, so the gateway keeps its ledger
claim and asks again under the same capture context. A dead stream's next request opens a new
call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any, Final, Protocol

import grpc

from relay import rpc
from relay.config import PciClientConfig
from relay.errors import ConfigError, OutcomeUnknown, RelayError, Unavailable
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.tlsfiles import check_ca_bundle, check_key_pair

MERCHANT_METADATA_KEY = "x-relay-merchant-id"
ANSWER_GRACE_SECONDS: Final = 15.0
"""How long an answer may take past the item's own timeout: PciRelay never stops an item whose
card is on its way to Flex, and its Flex POST may take its whole HTTP timeout (10 s default)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PciToken:
    """What PciRelay returned: a transient token not yet verified by us."""

    request_id: str
    transient_token: str = dataclasses.field(repr=False)
    jti: str
    expires_at: int
    receipt: str = dataclasses.field(default="", repr=False)
    """PciRelay's signed receipt for this release, passed on to the app unverified."""


def open_channel(config: PciClientConfig) -> grpc.aio.Channel:
    """A channel to PciRelay: mutual TLS, or plaintext under --insecure-dev."""
    options: list[tuple[str, Any]] = [("grpc.keepalive_time_ms", 60_000)]
    if config.insecure_dev:
        return grpc.aio.insecure_channel(config.target, options=options)
    files = (config.ca_file, config.tls_key_file, config.tls_cert_file)
    if None in files:
        raise ConfigError(["the PciRelay client needs a CA, a client key and a certificate"])
    ca, key, cert = (_read(path) for path in files)
    check_ca_bundle(ca, name=f"RELAY_MERCHANT_PCI_CA_FILE ({_name(config.ca_file)})")
    check_key_pair(
        cert,
        key,
        cert_name=f"RELAY_MERCHANT_PCI_TLS_CERT_FILE ({_name(config.tls_cert_file)})",
        key_name=f"RELAY_MERCHANT_PCI_TLS_KEY_FILE ({_name(config.tls_key_file)})",
    )
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(config.target, credentials, options=options)


class PciLink(Protocol):
    """A way to PciRelay for one request at a time: unary calls, or one multiplexed stream."""

    async def tokenize(  # noqa: PLR0913  one request's fields
        self,
        app_id: str,
        request_id: str,
        capture_context: str,
        card_ref: str,
        *,
        timeout: float,
        repeat: bool = False,
    ) -> PciToken:
        """Send app_id's request; PciRelay drops it unsent once `timeout` seconds have passed.

        repeat: this context went out before for this request without an answer.

        Raises the RelayError PciRelay answered with (nothing was tokenized), or OutcomeUnknown
        when the request was sent and no answer came back.
        """
        ...

    def withdraw(self, app_id: str, request_id: str) -> None:
        """The caller has left: ask PciRelay to drop the request if it has not sent it yet."""
        ...


class PciClient:
    """Tokenize (unary) and a multiplexed TokenizeStream."""

    def __init__(self, channel: grpc.aio.Channel, config: PciClientConfig) -> None:
        """Use the shared channel; under --insecure-dev the merchant id travels as metadata."""
        self._stub = pci_relay_pb2_grpc.PciRelayStub(channel)  # type: ignore[no-untyped-call]
        self._metadata = (
            ((MERCHANT_METADATA_KEY, config.merchant_id),) if config.insecure_dev else ()
        )

    async def tokenize(  # noqa: PLR0913  one request's fields
        self,
        app_id: str,
        request_id: str,
        capture_context: str,
        card_ref: str,
        *,
        timeout: float,
        repeat: bool = False,
    ) -> PciToken:
        """See PciLink.tokenize: one Tokenize call that outlives the item's timeout."""
        request = _request(
            app_id, request_id, capture_context, card_ref, timeout=timeout, repeat=repeat
        )
        try:
            result = await self._stub.Tokenize(
                request, timeout=timeout + ANSWER_GRACE_SECONDS, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _answer_or_unknown(exc, request_id) from None
        return _token_of(result)

    def withdraw(self, app_id: str, request_id: str) -> None:
        """Nothing to do: a unary request is dropped unsent by its own timeout."""

    def stream(self) -> PciStream:
        """A multiplexer over TokenizeStream calls (opened lazily)."""
        return PciStream(self._stub, self._metadata)


class PciStream:
    """Many tokenizations over one TokenizeStream, correlated by request_id."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:  # noqa: ANN401
        """Use PciClient.stream."""
        self._stub = stub
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, tuple[object, asyncio.Future[PciToken]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self._withdrawals: set[asyncio.Task[None]] = set()
        self._closing = False

    async def tokenize(  # noqa: PLR0913  one request's fields
        self,
        app_id: str,
        request_id: str,
        capture_context: str,
        card_ref: str,
        *,
        timeout: float,
        repeat: bool = False,
    ) -> PciToken:
        """See PciLink.tokenize: one item on the stream, and its answer.

        A stream serves one RequestTokens call, so one app: its items are told apart by
        request_id alone, as PciRelay's answers are.
        """
        if self._closing:  # nothing opens a new call behind close()
            raise Unavailable("the PciRelay stream is closing", request_id=request_id)
        if request_id in self._pending:
            raise Unavailable(
                "request_id is already in flight on this stream", request_id=request_id
            )
        future: asyncio.Future[PciToken] = asyncio.get_running_loop().create_future()
        try:
            async with self._lock:  # one writer at a time; gRPC flow control applies per write
                call = await self._ensure_call()
                self._add(request_id, call, future)
                await call.write(
                    _request(
                        app_id,
                        request_id,
                        capture_context,
                        card_ref,
                        timeout=timeout,
                        repeat=repeat,
                    )
                )
        except grpc.aio.AioRpcError as exc:
            self._discard(request_id, future)
            raise rpc.error_from_rpc(exc) from None
        except BaseException:
            self._discard(request_id, future)
            raise
        return await self._answer(request_id, future, timeout + ANSWER_GRACE_SECONDS)

    def withdraw(self, app_id: str, request_id: str) -> None:
        """See PciLink.withdraw: a withdrawal on the stream, if the request is still pending."""
        if request_id in self._pending:
            task = asyncio.create_task(
                self._write_withdrawal(app_id, request_id), name="pci-withdraw"
            )
            self._withdrawals.add(task)
            task.add_done_callback(self._withdrawals.discard)

    async def close(self) -> None:
        """Wait for every pending answer, then half-close the call and let it end."""
        self._closing = True
        await self._idle.wait()
        if self._call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _answer(
        self, request_id: str, future: asyncio.Future[PciToken], within: float
    ) -> PciToken:
        try:
            async with asyncio.timeout(within):
                return await asyncio.shield(future)
        except TimeoutError:
            raise OutcomeUnknown("PciRelay did not answer in time", request_id=request_id) from None
        finally:
            self._discard(request_id, future)  # answered, given up on, or its waiter cancelled

    async def _write_withdrawal(self, app_id: str, request_id: str) -> None:
        async with self._lock:
            call = self._call
            if call is None or call.done() or request_id not in self._pending:
                return
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(
                    pci_relay_pb2.PciTokenizeRequest(
                        app_id=app_id, request_id=request_id, withdraw=True
                    )
                )

    def _add(self, request_id: str, call: object, future: asyncio.Future[PciToken]) -> None:
        self._pending[request_id] = (call, future)
        self._idle.clear()

    def _discard(self, request_id: str, future: asyncio.Future[PciToken]) -> None:
        entry = self._pending.get(request_id)
        if entry is not None and entry[1] is future:
            del self._pending[request_id]
        if not self._pending:
            self._idle.set()

    async def _ensure_call(self) -> Any:  # noqa: ANN401  grpc's stream call type
        if self._call is None or self._call.done():
            self._call = self._stub.TokenizeStream(metadata=self._metadata)
            self._reader = asyncio.create_task(self._read(self._call), name="pci-stream-reader")
        return self._call

    async def _read(self, call: Any) -> None:  # noqa: ANN401
        try:
            async for result in call:
                _, future = self._pending.get(result.request_id, (None, None))
                if future is None or future.done():
                    continue
                self._discard(result.request_id, future)
                if result.WhichOneof("outcome") == "token":
                    future.set_result(_token_of(result))
                else:
                    future.set_exception(rpc.error_from_pb(result.error))
                    future.exception()  # seen here: its requester may have left
        except grpc.aio.AioRpcError:
            pass  # the call ended: what it still owed is unknown, below
        finally:
            for request_id, (owner, future) in list(self._pending.items()):
                if owner is call:
                    self._discard(request_id, future)
                    if not future.done():
                        future.set_exception(
                            OutcomeUnknown(
                                "the PciRelay stream ended before this answer",
                                request_id=request_id,
                            )
                        )
                        future.exception()  # seen here: its requester may have left
            if self._call is call:
                self._call = None


def _request(  # noqa: PLR0913  one request's fields
    app_id: str,
    request_id: str,
    capture_context: str,
    card_ref: str,
    *,
    timeout: float,
    repeat: bool,
) -> pci_relay_pb2.PciTokenizeRequest:
    request = pci_relay_pb2.PciTokenizeRequest(
        app_id=app_id,
        request_id=request_id,
        capture_context=capture_context,
        card_ref=card_ref,
        repeat=repeat,
    )
    request.timeout.FromTimedelta(dt.timedelta(seconds=max(timeout, 0.0)))
    return request


def _answer_or_unknown(exc: grpc.aio.AioRpcError, request_id: str) -> RelayError:
    """PciRelay's own answer, or OutcomeUnknown when the call failed without one."""
    if any(key == rpc.REASON_KEY for key, _ in exc.trailing_metadata() or ()):
        return rpc.error_from_rpc(exc)
    return OutcomeUnknown("the PciRelay call failed without an answer", request_id=request_id)


def _token_of(result: pci_relay_pb2.PciTokenizeResult) -> PciToken:
    token = result.token
    return PciToken(
        result.request_id,
        token.transient_token,
        token.jti,
        token.expires_at.ToSeconds(),
        token.receipt,
    )


def _read(path: str | None) -> bytes:
    assert path is not None
    try:
        return Path(path).read_bytes()
    except OSError:
        raise ConfigError([f"cannot read TLS file {Path(path).name}"]) from None


def _name(path: str | None) -> str:
    return Path(path).name if path else ""
