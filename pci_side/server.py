"""The PciRelay gRPC servicer: pb in, one call to the Tokenizer, pb out.

TokenizeStream works on at most `concurrency` requests of a stream at once (relay.streams), so
gRPC flow control pushes back on the merchant side. Results go out as they finish, correlated
by request_id; a failed item is a result with an Error, and the stream goes on. Each item
carries its own timeout (after which it is dropped unsent), and the sender may withdraw an
item that has not been sent yet; an item already sent always finishes and is answered.

The tokenizer audits what happens inside it. A call refused before it (the caller names no
merchant, or the request does not parse: see `unparseable`) is audited here, as `refused`,
before the call is aborted.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from pci_side.identity import merchant_from_context
from pci_side.tokenize import IssuedToken, Progress, Tokenizer, TokenizeRequest
from relay import rpc
from relay.errors import InvalidRequest, PermissionDenied, RelayError, Withdrawn
from relay.pb.v1 import pci_relay_pb2, pci_relay_pb2_grpc
from relay.peers import peer_of
from relay.streams import bounded_map, take_until

Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger("pci_side.server")
_STREAM = "TokenizeStream"


class RefusalRecorder(Protocol):
    """Appends a refused call to the audit chain: `CardVault.record_refusal`."""

    def __call__(self, reason: str, actor: str) -> Awaitable[object]:
        """Record that actor's call was refused for reason (a relay reason code)."""
        ...


class PciRelayService(pci_relay_pb2_grpc.PciRelayServicer):
    """Tokenize and TokenizeStream over one Tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        record_refusal: RefusalRecorder,
        concurrency: int,
        insecure_dev: bool,
        draining: asyncio.Event | None = None,
    ) -> None:
        """Bound each stream's work to `concurrency`; insecure_dev reads ids from metadata.

        Once `draining` is set, streams read no further item: those in progress finish, and
        then the stream ends, so the merchant side sends the rest to another replica.
        `record_refusal` audits the calls refused before the tokenizer.
        """
        self._tokenizer = tokenizer
        self._record_refusal = record_refusal
        self._concurrency = concurrency
        self._insecure_dev = insecure_dev
        self._draining = draining if draining is not None else asyncio.Event()

    @rpc.unary
    async def Tokenize(  # noqa: N802  the generated servicer's method name
        self, request: pci_relay_pb2.PciTokenizeRequest, context: Context
    ) -> pci_relay_pb2.PciTokenizeResult:
        """One request, one result; failures are gRPC statuses with a relay-reason."""
        merchant = await self._merchant(context)
        send_by = _send_by(request, context.time_remaining())
        result = _result(await self._tokenizer.tokenize(merchant, _domain(request, send_by)))
        result.app_id = request.app_id
        return result

    @rpc.stream
    async def TokenizeStream(  # noqa: N802  the generated servicer's method name
        self, requests: AsyncIterator[pci_relay_pb2.PciTokenizeRequest], context: Context
    ) -> AsyncIterator[pci_relay_pb2.PciTokenizeResult]:
        """Many requests; each result (token or per-item error) streams back as it finishes."""
        merchant = await self._merchant(context)
        items: dict[_ItemKey, _Item] = {}

        async def work(
            request: pci_relay_pb2.PciTokenizeRequest,
        ) -> pci_relay_pb2.PciTokenizeResult:
            result = await self._one_of_many(context, merchant, request, items)
            result.app_id = request.app_id
            return result

        admitted = _withdrawing(take_until(requests, self._draining), items)
        async for result in bounded_map(admitted, work, concurrency=self._concurrency):
            yield result

    async def unparseable(self, context: Context, _method: str, exc: RelayError) -> None:
        """Audit a request that did not parse (relay.rpc calls this before refusing it)."""
        await self._audit_refusal(context, exc)

    async def _merchant(self, context: Context) -> str:
        """The calling merchant; a caller that names none is audited, then refused."""
        try:
            return merchant_from_context(context, insecure_dev=self._insecure_dev)
        except PermissionDenied as exc:
            await self._audit_refusal(context, exc)
            raise

    async def _audit_refusal(self, context: Context, exc: RelayError) -> None:
        await self._record_refusal(exc.reason, peer_of(context).identity)

    async def _one_of_many(
        self,
        context: Context,
        merchant: str,
        request: pci_relay_pb2.PciTokenizeRequest,
        items: dict[_ItemKey, _Item],
    ) -> pci_relay_pb2.PciTokenizeResult:
        item = items.get(_key(request))
        if item is None or item.request is not request:
            duplicate = InvalidRequest(
                "request_id is already in progress on this stream", request_id=request.request_id
            )
            return _error(context, request.request_id, duplicate)
        if item.withdrawn:
            del items[_key(request)]
            return _error(context, request.request_id, _withdrawn(request))
        try:
            domain = _domain(request, item.send_by)
            item.task = asyncio.create_task(
                self._tokenizer.tokenize(merchant, domain, item.progress)
            )
            return _result(await item.task)
        except RelayError as exc:
            return _error(context, request.request_id, exc)
        except asyncio.CancelledError:
            if item.task is not None and item.task.cancelled() and not _cancelling():
                return _error(context, request.request_id, _withdrawn(request))
            raise  # the stream itself ends
        except Exception:  # noqa: BLE001  one bad item must not end the stream
            _log.exception("tokenize_crashed", request_id=request.request_id)
            return _error(context, request.request_id, rpc.internal_error())
        finally:
            if items.get(_key(request)) is item:
                del items[_key(request)]


_ItemKey = tuple[str, str]
"""(app_id, request_id): request ids are the merchant's apps' own."""


def _key(request: pci_relay_pb2.PciTokenizeRequest) -> _ItemKey:
    return request.app_id, request.request_id


@dataclasses.dataclass(slots=True)
class _Item:
    """An item on a stream, which its sender may withdraw until it is sent to Flex."""

    request: pci_relay_pb2.PciTokenizeRequest
    send_by: float | None
    """Counted from the item's arrival, not from when a slot of the stream frees up for it."""
    progress: Progress = dataclasses.field(default_factory=Progress)
    task: asyncio.Task[IssuedToken] | None = None
    withdrawn: bool = False

    def withdraw(self) -> None:
        if self.progress.sent or self.withdrawn:
            return
        self.withdrawn = True
        if self.task is not None:
            self.task.cancel()


async def _withdrawing(
    requests: AsyncIterator[pci_relay_pb2.PciTokenizeRequest], items: dict[_ItemKey, _Item]
) -> AsyncIterator[pci_relay_pb2.PciTokenizeRequest]:
    """The stream's items, registered as they arrive; withdrawals are acted on here."""
    async for request in requests:
        if not request.withdraw:
            if _key(request) not in items:
                items[_key(request)] = _Item(request, _send_by(request, None))
            yield request
        elif (item := items.get(_key(request))) is not None:
            item.withdraw()


def _withdrawn(request: pci_relay_pb2.PciTokenizeRequest) -> Withdrawn:
    return Withdrawn("withdrawn before it was sent", request_id=request.request_id)


def _cancelling() -> bool:
    """Whether this task itself is being cancelled (the stream ends), not only its item."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _send_by(request: pci_relay_pb2.PciTokenizeRequest, remaining: float | None) -> float | None:
    """The event-loop time after which the card must not be sent: item timeout or call deadline."""
    limits = [remaining] if remaining is not None else []
    if request.HasField("timeout"):
        limits.append(request.timeout.ToTimedelta().total_seconds())
    return asyncio.get_running_loop().time() + min(limits) if limits else None


def _domain(request: pci_relay_pb2.PciTokenizeRequest, send_by: float | None) -> TokenizeRequest:
    return TokenizeRequest(
        request.request_id,
        request.capture_context,
        request.card_ref,
        send_by,
        request.repeat,
        request.app_id,
    )


def _result(issued: IssuedToken) -> pci_relay_pb2.PciTokenizeResult:
    expires = Timestamp()
    expires.FromSeconds(issued.expires_at)
    token = pci_relay_pb2.PciTransientToken(
        transient_token=issued.token, jti=issued.jti, expires_at=expires, receipt=issued.receipt
    )
    return pci_relay_pb2.PciTokenizeResult(request_id=issued.request_id, token=token)


def _error(context: Context, request_id: str, exc: RelayError) -> pci_relay_pb2.PciTokenizeResult:
    error = rpc.refused(context, _STREAM, exc)
    return pci_relay_pb2.PciTokenizeResult(request_id=request_id, error=error)
