"""A small typed async client for merchant apps calling the MerchantGateway.

    async with MerchantClient.connect("gw:50052", ca_file=ca, cert_file=crt, key_file=key) as gw:
        token = await gw.request_token("order-1234", "card-0001")
        print(token.masked_pan, token.jti, token.expires_at)

Failures raise the relay's own errors (relay.errors), rebuilt from the gRPC status, so a
caller can `except CardNotFound` or check `exc.retryable`.

Each token carries the PCI side's signed receipt of its release. An app checks it offline with
the PCI side's public receipt key (`relay pci receipt-key public`)::

    receipt = token.verify_receipt(pci_receipt_public_pem)   # ReceiptInvalid if it does not hold
    # or: verify_receipt(token.receipt, pem, transient_token=token.transient_token)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from relay import rpc
from relay.errors import ReceiptInvalid, RelayError
from relay.flex.fields import FieldSpec
from relay.pb.v1 import common_pb2, merchant_gateway_pb2, merchant_gateway_pb2_grpc
from relay.receipts import Receipt, verify_receipt

__all__ = [
    "MerchantClient",
    "Outcome",
    "Receipt",
    "ReceiptInvalid",
    "Request",
    "Session",
    "Token",
    "verify_receipt",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """A capture context created and verified by the gateway."""

    capture_context: str = dataclasses.field(repr=False)
    jti: str
    expires_at: dt.datetime


@dataclasses.dataclass(frozen=True, slots=True)
class Token:
    """A verified transient token and the masked card facts that come with it."""

    request_id: str
    card_ref: str
    transient_token: str = dataclasses.field(repr=False)
    jti: str
    expires_at: dt.datetime
    masked_pan: str
    bin: str
    card_type: str
    receipt: str = dataclasses.field(default="", repr=False)
    """The PCI side's signed receipt of this release (a compact JWS); see verify_receipt."""

    def verify_receipt(self, public_key_pem: bytes) -> Receipt:
        """The receipt's claims, checked against the PCI side's key and bound to this token.

        Raises ReceiptInvalid if the receipt is missing, forged, or for another token.
        """
        return verify_receipt(self.receipt, public_key_pem, transient_token=self.transient_token)


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One result of a bulk request: a token, or the error for that request alone."""

    request_id: str
    card_ref: str
    token: Token | None
    error: RelayError | None


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One card to tokenize in a bulk request."""

    request_id: str
    card_ref: str
    fields: tuple[FieldSpec, ...] = ()


class MerchantClient:
    """Calls MerchantGateway over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """Wrap an open channel; prefer connect() or insecure()."""
        self._channel = channel
        self._stub = merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)  # type: ignore[no-untyped-call]

    @classmethod
    def connect(
        cls,
        target: str,
        *,
        ca_file: str | Path,
        cert_file: str | Path,
        key_file: str | Path,
        server_name: str | None = None,
    ) -> MerchantClient:
        """A mutually authenticated TLS channel to the gateway."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(ca_file).read_bytes(),
            private_key=Path(key_file).read_bytes(),
            certificate_chain=Path(cert_file).read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        return cls(grpc.aio.secure_channel(target, credentials, options=options))

    @classmethod
    def insecure(cls, target: str) -> MerchantClient:
        """Plaintext, for a gateway started with --insecure-dev on loopback."""
        return cls(grpc.aio.insecure_channel(target))

    async def __aenter__(self) -> Self:
        """Use as an async context manager."""
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the channel."""
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def create_session(
        self, fields: Sequence[FieldSpec] = (), *, timeout: float = 30
    ) -> Session:
        """A fresh capture context."""
        response = await self._call(
            self._stub.CreateSession,
            merchant_gateway_pb2.CreateSessionRequest(fields=_fields(fields)),
            timeout,
        )
        return Session(
            response.capture_context, response.jti, response.expires_at.ToDatetime(dt.UTC)
        )

    async def request_token(
        self,
        request_id: str,
        card_ref: str,
        fields: Sequence[FieldSpec] = (),
        *,
        timeout: float = 30,
    ) -> Token:
        """Tokenize one card; the same request_id returns the same token for its 15 minutes."""
        request = merchant_gateway_pb2.TokenRequest(
            request_id=request_id, card_ref=card_ref, fields=_fields(fields)
        )
        return _token(await self._call(self._stub.RequestToken, request, timeout))

    async def get_token(self, request_id: str, *, timeout: float = 10) -> Token:
        """The token recorded under request_id while it lives."""
        request = merchant_gateway_pb2.GetTokenRequest(request_id=request_id)
        return _token(await self._call(self._stub.GetToken, request, timeout))

    async def request_tokens(
        self, requests: Iterable[Request] | AsyncIterable[Request], *, timeout: float | None = None
    ) -> AsyncIterator[Outcome]:
        """Bulk tokenization: outcomes arrive as each finishes, in any order."""
        call = self._stub.RequestTokens(_requests(requests), timeout=timeout)
        try:
            async for result in call:
                if result.WhichOneof("outcome") == "token":
                    yield Outcome(result.request_id, result.card_ref, _token(result), None)
                else:
                    error = rpc.error_from_pb(result.error)
                    yield Outcome(result.request_id, result.card_ref, None, error)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:  # noqa: ANN401
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise rpc.error_from_rpc(exc) from None


async def _requests(
    requests: Iterable[Request] | AsyncIterable[Request],
) -> AsyncIterator[merchant_gateway_pb2.TokenRequest]:
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            yield _pb_request(request)
    else:
        for request in requests:
            yield _pb_request(request)


def _pb_request(request: Request) -> merchant_gateway_pb2.TokenRequest:
    return merchant_gateway_pb2.TokenRequest(
        request_id=request.request_id, card_ref=request.card_ref, fields=_fields(request.fields)
    )


def _fields(fields: Sequence[FieldSpec]) -> list[common_pb2.FieldSpec]:
    return [common_pb2.FieldSpec(path=spec.path, required=spec.required) for spec in fields]


def _token(result: merchant_gateway_pb2.TokenResult) -> Token:
    token = result.token
    return Token(
        request_id=result.request_id,
        card_ref=result.card_ref,
        transient_token=token.transient_token,
        jti=token.jti,
        expires_at=token.expires_at.ToDatetime(dt.UTC),
        masked_pan=token.masked_pan,
        bin=token.bin,
        card_type=token.card_type,
        receipt=token.receipt,
    )
