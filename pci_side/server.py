"""The PciRelay gRPC servicer: pb in, one call to the Tokenizer, pb out.

TokenizeStream works on at most `concurrency` requests of a stream at once (relay.streams), so
gRPC flow control pushes back on the merchant side. Results go out as they finish, correlated
by request_id; a failed item is a result with an Error, and the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from pci_side.identity import merchant_from_context
from pci_side.tokenize import IssuedToken, Tokenizer, TokenizeRequest
from relay import rpc
from relay.errors import DeadlineExceeded, RelayError
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.streams import bounded_map

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("pci_side.server")


class PciRelayService(pci_relay_pb2_grpc.PciRelayServicer):
    """Tokenize and TokenizeStream over one Tokenizer."""

    def __init__(self, tokenizer: Tokenizer, *, concurrency: int, insecure_dev: bool) -> None:
        """Bound each stream's work to `concurrency`; insecure_dev reads ids from metadata."""
        self._tokenizer = tokenizer
        self._concurrency = concurrency
        self._insecure_dev = insecure_dev

    @rpc.unary
    async def Tokenize(  # noqa: N802  the generated servicer's method name
        self, request: pci_relay_pb2.PciTokenizeRequest, context: Context
    ) -> pci_relay_pb2.PciTokenizeResult:
        """One request, one result; failures are gRPC statuses with a relay-reason."""
        merchant = merchant_from_context(context, insecure_dev=self._insecure_dev)
        issued = await _within_deadline(
            self._tokenizer.tokenize(merchant, _domain(request)), context.time_remaining()
        )
        return _result(issued)

    @rpc.stream
    async def TokenizeStream(  # noqa: N802  the generated servicer's method name
        self, requests: AsyncIterator[pci_relay_pb2.PciTokenizeRequest], context: Context
    ) -> AsyncIterator[pci_relay_pb2.PciTokenizeResult]:
        """Many requests; each result (token or per-item error) streams back as it finishes."""
        merchant = merchant_from_context(context, insecure_dev=self._insecure_dev)

        async def work(
            request: pci_relay_pb2.PciTokenizeRequest,
        ) -> pci_relay_pb2.PciTokenizeResult:
            return await self._result_or_error(merchant, request)

        async for result in bounded_map(requests, work, concurrency=self._concurrency):
            yield result

    async def _result_or_error(
        self, merchant: str, request: pci_relay_pb2.PciTokenizeRequest
    ) -> pci_relay_pb2.PciTokenizeResult:
        try:
            return _result(await self._tokenizer.tokenize(merchant, _domain(request)))
        except RelayError as exc:
            return _error(request.request_id, exc)
        except Exception:  # noqa: BLE001  one bad item must not end the stream
            _log.exception("tokenize_crashed", request_id=request.request_id)
            return _error(request.request_id, rpc.internal_error())


async def _within_deadline(call: Any, remaining: float | None) -> IssuedToken:  # noqa: ANN401
    if remaining is None:
        result: IssuedToken = await call
        return result
    try:
        async with asyncio.timeout(remaining):
            result = await call
    except TimeoutError:
        raise DeadlineExceeded("the call's deadline passed") from None
    return result


def _domain(request: pci_relay_pb2.PciTokenizeRequest) -> TokenizeRequest:
    return TokenizeRequest(request.request_id, request.capture_context, request.card_ref)


def _result(issued: IssuedToken) -> pci_relay_pb2.PciTokenizeResult:
    expires = Timestamp()
    expires.FromSeconds(issued.expires_at)
    token = pci_relay_pb2.PciTransientToken(
        transient_token=issued.token, jti=issued.jti, expires_at=expires
    )
    return pci_relay_pb2.PciTokenizeResult(request_id=issued.request_id, token=token)


def _error(request_id: str, exc: RelayError) -> pci_relay_pb2.PciTokenizeResult:
    return pci_relay_pb2.PciTokenizeResult(request_id=request_id, error=rpc.error_to_pb(exc))
