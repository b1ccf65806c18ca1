"""The MerchantGateway gRPC servicer: pb in, one Gateway call, pb out.

Every call is first put to its app (merchant_side.identity) and that app's rate limit: each RPC
counts one, and so does each item of a RequestTokens stream, so a stream is no way around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from merchant_side.gateway import Gateway, TokenRequest
from merchant_side.identity import app_from_context
from merchant_side.ledger import TokenRecord
from merchant_side.pci_client import PciClient, PciStream
from relay import rpc
from relay.errors import RelayError, Unavailable
from relay.flex.fields import FieldSpec
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc
from relay.ratelimit import RateLimiter
from relay.streams import bounded_map

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("merchant_side.server")


class MerchantGatewayService(merchant_gateway_pb2_grpc.MerchantGatewayServicer):
    """CreateSession, RequestToken, RequestTokens and GetToken over one Gateway."""

    def __init__(  # noqa: PLR0913  the service's collaborators and settings
        self,
        gateway: Gateway,
        pci: PciClient,
        *,
        bulk_concurrency: int,
        limiter: RateLimiter,
        insecure_dev: bool,
        draining: asyncio.Event | None = None,
    ) -> None:
        """Share the gateway, the PciRelay client and the per-app rate limiter across calls.

        insecure_dev: the server is plaintext, so every caller is merchant_side.identity.DEV_APP.
        Once `draining` is set, open RequestTokens streams answer each new item with a retryable
        UNAVAILABLE instead of starting it; items already started finish.
        """
        self._gateway = gateway
        self._pci = pci
        self._bulk_concurrency = bulk_concurrency
        self._limiter = limiter
        self._insecure_dev = insecure_dev
        self._draining = draining if draining is not None else asyncio.Event()

    @rpc.unary
    async def CreateSession(  # noqa: N802  the generated servicer's method name
        self, request: merchant_gateway_pb2.CreateSessionRequest, context: Context
    ) -> merchant_gateway_pb2.CreateSessionResponse:
        """A verified capture context, its jti and expiry."""
        self._admitted(context)
        ctx = await self._gateway.create_session(_fields(request.fields))
        return merchant_gateway_pb2.CreateSessionResponse(
            capture_context=ctx.raw, jti=ctx.jti, expires_at=_timestamp(ctx.expires_at)
        )

    @rpc.unary
    async def RequestToken(  # noqa: N802
        self, request: merchant_gateway_pb2.TokenRequest, context: Context
    ) -> merchant_gateway_pb2.TokenResult:
        """The whole flow for one card; failures are statuses with a relay-reason."""
        app_id = self._admitted(context)
        record = await self._gateway.request_token(
            _domain(request, app_id), self._pci, deadline=context.time_remaining()
        )
        return _result(record)

    @rpc.stream
    async def RequestTokens(  # noqa: N802
        self, requests: AsyncIterator[merchant_gateway_pb2.TokenRequest], context: Context
    ) -> AsyncIterator[merchant_gateway_pb2.TokenResult]:
        """Bulk: results stream back as each finishes, each a token or a per-item error."""
        app_id = self._app(context)
        stream = self._pci.stream()

        async def work(
            request: merchant_gateway_pb2.TokenRequest,
        ) -> merchant_gateway_pb2.TokenResult:
            if self._draining.is_set():
                return _error(
                    context, request, Unavailable("the gateway is draining: send this again")
                )
            try:
                self._limiter.acquire(app_id)
            except RelayError as exc:
                return _error(context, request, exc)
            # An item's deadline: the default, or what is left of the stream's, if less.
            remaining = context.time_remaining()
            deadline = self._gateway.default_deadline
            if remaining is not None:
                deadline = min(deadline, remaining)
            return await self._one_of_many(context, stream, _domain(request, app_id), deadline)

        try:
            async for result in bounded_map(requests, work, concurrency=self._bulk_concurrency):
                yield result
        finally:
            # Answers still owed by PciRelay are recorded first; then the stream half-closes.
            self._gateway.detach(stream.close())

    @rpc.unary
    async def GetToken(  # noqa: N802
        self, request: merchant_gateway_pb2.GetTokenRequest, context: Context
    ) -> merchant_gateway_pb2.TokenResult:
        """The caller's recorded token for a request_id while it lives, else NOT_FOUND."""
        app_id = self._admitted(context)
        return _result(await self._gateway.get_token(app_id, request.request_id))

    def _app(self, context: Context) -> str:
        return app_from_context(context, insecure_dev=self._insecure_dev)

    def _admitted(self, context: Context) -> str:
        """The calling app, once one call of its rate is taken (RateLimited if none is left)."""
        app_id = self._app(context)
        self._limiter.acquire(app_id)
        return app_id

    async def _one_of_many(
        self,
        context: Context,
        stream: PciStream,
        request: TokenRequest,
        deadline: float,
    ) -> merchant_gateway_pb2.TokenResult:
        try:
            record = await self._gateway.request_token(request, stream, deadline=deadline)
        except RelayError as exc:
            return _error(context, request, exc)
        except Exception:  # noqa: BLE001  one bad item must not end the stream
            _log.exception("request_crashed", request_id=request.request_id)
            return _error(context, request, rpc.internal_error())
        return _result(record)


def _error(
    context: Context,
    request: merchant_gateway_pb2.TokenRequest | TokenRequest,
    exc: RelayError,
) -> merchant_gateway_pb2.TokenResult:
    error = rpc.refused(context, "RequestTokens", exc)
    return merchant_gateway_pb2.TokenResult(
        request_id=request.request_id, card_ref=request.card_ref, error=error
    )


def _fields(specs: Any) -> tuple[FieldSpec, ...]:  # noqa: ANN401  a repeated pb field
    return tuple(FieldSpec(spec.path, spec.required) for spec in specs)


def _domain(request: merchant_gateway_pb2.TokenRequest, app_id: str) -> TokenRequest:
    fields = _fields(request.fields)
    return TokenRequest(request.request_id, request.card_ref, fields, app_id=app_id)


def _timestamp(seconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromSeconds(seconds)
    return stamp


def _result(record: TokenRecord) -> merchant_gateway_pb2.TokenResult:
    token = merchant_gateway_pb2.TransientToken(
        transient_token=record.transient_token,
        jti=record.jti,
        expires_at=_timestamp(record.expires_at),
        masked_pan=record.masked_pan,
        bin=record.bin,
        card_type=record.card_type,
        receipt=record.receipt,
    )
    return merchant_gateway_pb2.TokenResult(
        request_id=record.request_id, card_ref=record.card_ref, token=token
    )
