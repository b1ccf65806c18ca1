"""The merchant side's client of PciRelay: mutual TLS, errors rebuilt as RelayErrors.

`PciStream` multiplexes many tokenizations over one TokenizeStream call: `submit` writes a
request and returns a future resolved by the result with the same request_id. If the call dies,
every pending future fails with Unavailable and the next submit opens a new call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import grpc

from relay import rpc
from relay.config import PciClientConfig
from relay.errors import ConfigError, RelayError, Unavailable
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc

MERCHANT_METADATA_KEY = "x-relay-merchant-id"


@dataclasses.dataclass(frozen=True, slots=True)
class PciToken:
    """What PciRelay returned: a transient token not yet verified by us."""

    request_id: str
    transient_token: str = dataclasses.field(repr=False)
    jti: str
    expires_at: int


def open_channel(config: PciClientConfig) -> grpc.aio.Channel:
    """A channel to PciRelay: mutual TLS, or plaintext under --insecure-dev."""
    options: list[tuple[str, Any]] = [("grpc.keepalive_time_ms", 60_000)]
    if config.insecure_dev:
        return grpc.aio.insecure_channel(config.target, options=options)
    files = (config.ca_file, config.tls_key_file, config.tls_cert_file)
    if None in files:
        raise ConfigError(["the PciRelay client needs a CA, a client key and a certificate"])
    ca, key, cert = (_read(path) for path in files)
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
    return grpc.aio.secure_channel(config.target, credentials, options=options)


class PciClient:
    """Tokenize (unary) and a multiplexed TokenizeStream."""

    def __init__(self, channel: grpc.aio.Channel, config: PciClientConfig) -> None:
        """Use the shared channel; under --insecure-dev the merchant id travels as metadata."""
        self._stub = pci_relay_pb2_grpc.PciRelayStub(channel)  # type: ignore[no-untyped-call]
        self._metadata = (
            ((MERCHANT_METADATA_KEY, config.merchant_id),) if config.insecure_dev else ()
        )

    async def tokenize(
        self,
        request_id: str,
        capture_context: str,
        card_ref: str,
        *,
        timeout: float,
    ) -> PciToken:
        """One tokenization; raises the RelayError PciRelay raised."""
        request = pci_relay_pb2.PciTokenizeRequest(
            request_id=request_id, capture_context=capture_context, card_ref=card_ref
        )
        try:
            result = await self._stub.Tokenize(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None
        return _token_of(result)

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
        self._lock = asyncio.Lock()

    async def submit(self, request_id: str, capture_context: str, card_ref: str) -> PciToken:
        """Send one request on the stream and wait for its result."""
        if request_id in self._pending:
            raise Unavailable(
                "request_id is already in flight on this stream", request_id=request_id
            )
        future: asyncio.Future[PciToken] = asyncio.get_running_loop().create_future()
        try:
            async with self._lock:  # one writer at a time; gRPC flow control applies per write
                call = await self._ensure_call()
                self._pending[request_id] = (call, future)
                await call.write(
                    pci_relay_pb2.PciTokenizeRequest(
                        request_id=request_id, capture_context=capture_context, card_ref=card_ref
                    )
                )
        except grpc.aio.AioRpcError as exc:
            self._pending.pop(request_id, None)
            raise rpc.error_from_rpc(exc) from None
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return await future

    async def close(self) -> None:
        """Half-close the call, let pending results arrive, then stop."""
        if self._call is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _ensure_call(self) -> Any:  # noqa: ANN401  grpc's stream call type
        if self._call is None or self._call.done():
            self._call = self._stub.TokenizeStream(metadata=self._metadata)
            self._reader = asyncio.create_task(self._read(self._call), name="pci-stream-reader")
        return self._call

    async def _read(self, call: Any) -> None:  # noqa: ANN401
        failure: RelayError = Unavailable("the PciRelay stream ended")
        try:
            async for result in call:
                _, future = self._pending.pop(result.request_id, (None, None))
                if future is None or future.done():
                    continue
                if result.WhichOneof("outcome") == "token":
                    future.set_result(_token_of(result))
                else:
                    future.set_exception(rpc.error_from_pb(result.error))
        except grpc.aio.AioRpcError as exc:
            failure = rpc.error_from_rpc(exc)
        finally:
            for request_id, (owner, future) in list(self._pending.items()):
                if owner is call:
                    del self._pending[request_id]
                    if not future.done():
                        future.set_exception(failure)
            if self._call is call:
                self._call = None


def _token_of(result: pci_relay_pb2.PciTokenizeResult) -> PciToken:
    token = result.token
    return PciToken(
        result.request_id, token.transient_token, token.jti, token.expires_at.ToSeconds()
    )


def _read(path: str | None) -> bytes:
    assert path is not None
    try:
        return Path(path).read_bytes()
    except OSError:
        raise ConfigError([f"cannot read TLS file {Path(path).name}"]) from None
