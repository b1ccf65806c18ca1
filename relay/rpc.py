"""The only place a RelayError becomes a gRPC status, and back.

Servers wrap each method with `unary` or `stream`: a RelayError aborts with its status, its
message (fixed text plus ids) and trailing metadata `relay-reason`, `relay-retryable` and one
`relay-id-<name>` per id; anything else is logged (scrubbed) and becomes INTERNAL "internal
error", so an unexpected exception text never reaches a caller (STYLE leak 6). Clients map an
AioRpcError back with `error_from_rpc`, so merchant_side re-raises the class pci_side raised.
Streams report per-item failures as a pb Error (`error_to_pb` / `error_from_pb`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from relay.errors import DeadlineExceeded, RelayError, Unavailable
from relay.pb.v1 import common_pb2

REASON_KEY = "relay-reason"
RETRYABLE_KEY = "relay-retryable"
ID_PREFIX = "relay-id-"
_SAFE_VALUE = re.compile(r"^[\x20-\x7e]{0,256}$")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
_log = structlog.get_logger("relay.rpc")


def unary(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wrap a unary servicer method so that errors become statuses."""

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except RelayError as exc:
            await abort(context, exc)
        except Exception:  # noqa: BLE001  the edge: nothing unexpected leaves as text
            _log.exception("rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")

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
            await abort(context, exc)
        except Exception:  # noqa: BLE001  the edge: nothing unexpected leaves as text
            _log.exception("rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: RelayError) -> None:
    """Abort the call with the error's status, message and reason metadata."""
    await context.abort(exc.status, exc.message, trailing_metadata=error_metadata(exc))


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
