"""The only place a RelayError becomes a gRPC status, and back.

Servers wrap each method with `unary` or `stream`: a RelayError aborts with its status, its
message (fixed text plus ids) and trailing metadata `relay-reason`, `relay-retryable` and one
`relay-id-<name>` per id; anything else is logged (scrubbed) and becomes INTERNAL "internal
error", so an unexpected exception text never reaches a caller (STYLE leak 6). Clients map an
AioRpcError back with `error_from_rpc`, so merchant_side re-raises the class pci_side raised.
Streams report per-item failures as a pb Error (`refused` / `error_from_pb`).

Every refusal (a call aborted with a RelayError, or a per-item error of a stream) logs one
`call_refused` line naming the method, the reason, the status and the peer (relay.peers), and
nothing of the request. An unexpected exception is a failure, not a refusal: it logs
`rpc_failed` and no `call_refused`.

Services are registered with `add_service`, not the generated `add_*Servicer_to_server`: those
parse the request before any of our code runs, so bytes that are not the request message would
end as UNKNOWN naming the parser's exception class. Here the request arrives as bytes and is
parsed under our error mapping: INVALID_ARGUMENT INVALID_REQUEST "the request could not be
parsed", a refusal like any other. In a request stream, an item that does not parse aborts the
whole stream that way (it has no request_id to answer it by).
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from relay.errors import DeadlineExceeded, InvalidRequest, RelayError, Unavailable
from relay.pb.v1 import common_pb2
from relay.peers import peer_of

REASON_KEY = "relay-reason"
RETRYABLE_KEY = "relay-retryable"
ID_PREFIX = "relay-id-"
UNPARSEABLE = "the request could not be parsed"
_SAFE_VALUE = re.compile(r"^[\x20-\x7e]{0,256}$")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
Context = grpc.aio.ServicerContext[Any, Any]
RefusalHook = Callable[[Context, str, RelayError], Awaitable[None]]
"""Told of a request refused before the servicer ran (it did not parse): e.g. to audit it."""
_log = structlog.get_logger("relay.rpc")


def unary(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wrap a unary servicer method so that errors become statuses."""

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        return await _answer(context, method.__name__, lambda: method(self, request, context))

    return wrapper


def stream(
    method: Callable[[Self, Any, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Any, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    """Wrap a streaming servicer method (an async generator) the same way."""

    @functools.wraps(method)
    async def wrapper(
        self: Self,
        request: Any,  # noqa: ANN401  a request iterator or a single message
        context: grpc.aio.ServicerContext[Req, Resp],
    ) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except RelayError as exc:
            await refuse(context, method.__name__, exc)
        except Exception:  # noqa: BLE001  the edge: nothing unexpected leaves as text
            await _fail(context, method.__name__)

    return wrapper


async def _answer(context: Context, name: str, call: Callable[[], Awaitable[Resp]]) -> Resp:
    """call(), with a RelayError refused and anything else failed as INTERNAL."""
    try:
        return await call()
    except grpc.aio.AbortError:
        raise
    except RelayError as exc:
        await refuse(context, name, exc)
    except Exception:  # noqa: BLE001  the edge: nothing unexpected leaves as text
        await _fail(context, name)
    raise AssertionError("unreachable: abort raises")


async def _fail(context: Context, name: str) -> None:
    _log.exception("rpc_failed", method=name)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


async def refuse(context: Context, method: str, exc: RelayError) -> None:
    """Log the refusal, then abort the call with the error's status."""
    _log_refusal(context, method, exc)
    await abort(context, exc)


def refused(context: Context, method: str, exc: RelayError) -> common_pb2.Error:
    """Log the refusal of one stream item; the pb Error that answers it."""
    _log_refusal(context, method, exc)
    return error_to_pb(exc)


def _log_refusal(context: Context, method: str, exc: RelayError) -> None:
    _log.warning(
        "call_refused",
        method=method,
        reason=exc.reason,
        status=exc.status.name,
        ids={name: value for name, value in exc.ids.items() if _SAFE_VALUE.match(value)},
        **peer_of(context).log_fields(),
    )


async def abort(context: Context, exc: RelayError) -> None:
    """Abort the call with the error's status, message and reason metadata."""
    await context.abort(exc.status, exc.message, trailing_metadata=error_metadata(exc))


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    *,
    on_unparseable: RefusalHook | None = None,
) -> None:
    """Register servicer's methods for service, each parsing its own request bytes."""
    handlers = {
        method.name: _method_handler(getattr(servicer, method.name), method, on_unparseable)
        for method in service.methods
    }
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))


def _method_handler(
    bound: Callable[..., Any], method: MethodDescriptor, hook: RefusalHook | None
) -> grpc.RpcMethodHandler[Any, Any]:
    parser = _Parser(message_factory.GetMessageClass(method.input_type), method.name, hook)
    serialize: Callable[[Any], bytes] = _serialize
    if method.client_streaming and method.server_streaming:
        # An async generator function: grpc.aio tells streaming handlers apart by that.
        async def many_to_many(raw: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
            async for item in bound(parser.each(raw, context), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(many_to_many, response_serializer=serialize)
    if method.client_streaming:

        async def many_to_one(raw: AsyncIterator[bytes], context: Context) -> Any:  # noqa: ANN401
            return await bound(parser.each(raw, context), context)

        return grpc.stream_unary_rpc_method_handler(many_to_one, response_serializer=serialize)
    if method.server_streaming:

        async def one_to_many(raw: bytes, context: Context) -> AsyncIterator[Any]:
            async for item in bound(await parser.one(raw, context), context):
                yield item

        return grpc.unary_stream_rpc_method_handler(one_to_many, response_serializer=serialize)

    async def one(raw: bytes, context: Context) -> Any:  # noqa: ANN401  a pb message
        return await bound(await parser.one(raw, context), context)

    return grpc.unary_unary_rpc_method_handler(one, response_serializer=serialize)


def _serialize(message: Any) -> bytes:  # noqa: ANN401  a pb message
    return bytes(message.SerializeToString())


class _Parser:
    """Request bytes to a message; what does not parse is refused as INVALID_REQUEST."""

    def __init__(self, message_class: Any, name: str, hook: RefusalHook | None) -> None:  # noqa: ANN401
        self._class = message_class
        self._name = name
        self._hook = hook

    async def one(self, raw: bytes, context: Context) -> Any:  # noqa: ANN401  a pb message
        """The request, or the call aborted (hook told first)."""
        return await _answer(context, self._name, lambda: self._parse(raw, context))

    async def each(self, raw: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        """The requests of a stream; a bad one raises InvalidRequest into the servicer's stream."""
        async for item in raw:
            yield await self._parse(item, context)

    async def _parse(self, raw: bytes, context: Context) -> Any:  # noqa: ANN401  a pb message
        try:
            return self._class.FromString(raw)
        except Exception:  # noqa: BLE001  whatever the parser raises, its text is not sent
            exc = InvalidRequest(UNPARSEABLE)
        if self._hook is not None:
            await self._hook(context, self._name, exc)
        raise exc


def error_metadata(exc: RelayError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the reason and the ids (ASCII only, never card data)."""
    pairs = [(REASON_KEY, exc.reason), (RETRYABLE_KEY, "1" if exc.retryable else "0")]
    for name, value in exc.ids.items():
        key = ID_PREFIX + name.lower().replace("_", "-")
        if re.fullmatch(r"[a-z0-9-]{1,48}", key[len(ID_PREFIX) :]) and _SAFE_VALUE.match(value):
            pairs.append((key, value))
    return tuple(pairs)


def error_from_rpc(exc: grpc.aio.AioRpcError) -> RelayError:
    """The RelayError a peer raised, rebuilt from its status and trailing metadata."""
    metadata = {
        key: value for key, value in (exc.trailing_metadata() or ()) if isinstance(value, str)
    }
    ids = {
        key[len(ID_PREFIX) :].replace("-", "_"): value
        for key, value in metadata.items()
        if key.startswith(ID_PREFIX)
    }
    cls = RelayError.by_reason.get(metadata.get(REASON_KEY, ""))
    if cls is not None:
        return cls.from_wire(exc.details() or exc.code().name.lower(), ids)
    # No relay reason: the failure came from gRPC itself (connect, TLS, deadline), whose text
    # names internal addresses. Callers get fixed text instead.
    cls = _BY_STATUS.get(exc.code(), RelayError)
    return cls.from_wire(f"the peer service call failed ({exc.code().name})", ids)


_BY_STATUS: dict[grpc.StatusCode, type[RelayError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Unavailable,
}


def error_to_pb(exc: RelayError) -> common_pb2.Error:
    """A per-item error for a stream result."""
    return common_pb2.Error(
        code=exc.status.name,
        reason=exc.reason,
        message=exc.message,
        metadata=dict(pair for pair in error_metadata(exc) if pair[0].startswith(ID_PREFIX)),
        retryable=exc.retryable,
    )


def error_from_pb(error: common_pb2.Error) -> RelayError:
    """The RelayError behind a per-item stream error."""
    ids = {
        key[len(ID_PREFIX) :].replace("-", "_"): value
        for key, value in error.metadata.items()
        if key.startswith(ID_PREFIX)
    }
    cls = RelayError.by_reason.get(error.reason, RelayError)
    return cls.from_wire(error.message, ids)


def internal_error() -> RelayError:
    """What an unexpected exception is reported as."""
    return RelayError("internal error")
