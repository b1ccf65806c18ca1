"""relay.rpc over a real grpc.aio server on loopback: statuses, reasons, ids, and back.

Services are registered with rpc.add_service, so requests are parsed under the error mapping,
and every refusal logs one `call_refused` line.
"""

from __future__ import annotations

import io
import json
from typing import Any, ClassVar

import grpc
import pytest

from relay import rpc
from relay.errors import (
    CaptureContextExpired,
    CardNotFound,
    FlexRejected,
    NotGranted,
    RelayError,
    Unavailable,
)
from relay.pb.v1 import common_pb2, pci_relay_pb2, pci_relay_pb2_grpc


class Raising(pci_relay_pb2_grpc.PciRelayServicer):
    """Raises whatever the request's card_ref names."""

    ERRORS: ClassVar[dict[str, RelayError]] = {
        "missing": CardNotFound("card not found", card_ref="missing"),
        "hidden": NotGranted("card not found", card_ref="missing"),
        "expired": CaptureContextExpired("capture context has expired", jti="J1"),
        "flex": FlexRejected(
            "Flex tokens answered 400", http_status=400, flex_reason="INVALID_DATA"
        ),
    }

    @rpc.unary
    async def Tokenize(self, request, _context):  # noqa: N802
        if request.card_ref == "crash":
            int("not a number 4111 1111 1111 1111")
        raise self.ERRORS[request.card_ref]

    @rpc.stream
    async def TokenizeStream(self, requests, _context):  # noqa: N802
        async for request in requests:
            yield pci_relay_pb2.PciTokenizeResult(request_id=request.request_id)
            raise CardNotFound("card not found", card_ref=request.card_ref)


SERVICE = pci_relay_pb2.DESCRIPTOR.services_by_name["PciRelay"]
TOKENIZE = "/relay.pb.v1.PciRelay/Tokenize"
TOKENIZE_STREAM = "/relay.pb.v1.PciRelay/TokenizeStream"


@pytest.fixture
def hooked() -> list[tuple[str, str]]:
    """(method, reason) of each request the server refused before its servicer ran."""
    return []


@pytest.fixture
async def channel(hooked):
    async def on_unparseable(_context: Any, method: str, exc: RelayError) -> None:
        hooked.append((method, exc.reason))

    server = grpc.aio.server()
    rpc.add_service(server, Raising(), SERVICE, on_unparseable=on_unparseable)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


@pytest.fixture
def stub(channel):
    return pci_relay_pb2_grpc.PciRelayStub(channel)


def logged(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    """The JSON lines of one event written to the log_stream fixture."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in lines if line["event"] == event]


async def call(stub, card_ref: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Tokenize(pci_relay_pb2.PciTokenizeRequest(request_id="r1", card_ref=card_ref))
    return info.value


async def test_relay_error_becomes_its_status_and_comes_back_as_its_class(stub) -> None:
    """CaptureContextExpired travels as FAILED_PRECONDITION and is rebuilt with its ids."""
    exc = await call(stub, "expired")
    rebuilt = rpc.error_from_rpc(exc)
    assert (grpc.StatusCode.FAILED_PRECONDITION, CaptureContextExpired, {"jti": "J1"}) == (
        exc.code(),
        type(rebuilt),
        rebuilt.ids,
    )


async def test_not_granted_is_indistinguishable_from_not_found_on_the_wire(stub) -> None:
    """Code, details and metadata are identical for an unknown card and an ungranted one."""
    missing, hidden = await call(stub, "missing"), await call(stub, "hidden")
    assert (missing.code(), missing.details(), missing.trailing_metadata()) == (
        hidden.code(),
        hidden.details(),
        hidden.trailing_metadata(),
    )


async def test_flex_reason_survives_the_trip(stub) -> None:
    """A FlexRejected keeps its Flex reason across gRPC."""
    rebuilt = rpc.error_from_rpc(await call(stub, "flex"))
    assert (FlexRejected, "INVALID_DATA") == (type(rebuilt), rebuilt.flex_reason)


async def test_unexpected_exception_is_internal_without_its_text(stub) -> None:
    """A crash becomes INTERNAL 'internal error'; its message never reaches the caller."""
    exc = await call(stub, "crash")
    assert (grpc.StatusCode.INTERNAL, "internal error") == (exc.code(), exc.details())


async def test_stream_error_after_items_ends_with_the_status(stub) -> None:
    """A stream yields its items, then aborts with the error's status."""
    request = pci_relay_pb2.PciTokenizeRequest(request_id="s1", card_ref="c1")
    call_ = stub.TokenizeStream(iter([request]))
    first = await call_.read()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_.read()
    assert ("s1", grpc.StatusCode.NOT_FOUND) == (first.request_id, info.value.code())


def test_pb_error_round_trip() -> None:
    """error_to_pb and error_from_pb rebuild the class, message and ids."""
    original = CardNotFound("card not found", card_ref="abc")
    pb = rpc.error_to_pb(original)
    rebuilt = rpc.error_from_pb(pb)
    assert ("NOT_FOUND", "CARD_NOT_FOUND", CardNotFound, {"card_ref": "abc"}) == (
        pb.code,
        pb.reason,
        type(rebuilt),
        rebuilt.ids,
    )


def test_unknown_reason_falls_back_to_relay_error() -> None:
    """A reason this build does not know becomes a plain RelayError with the message."""
    rebuilt = rpc.error_from_pb(common_pb2.Error(reason="NEW_THING", message="m"))
    assert (RelayError, "m") == (type(rebuilt), rebuilt.message)


def test_metadata_drops_ids_that_are_not_plain_ascii() -> None:
    """Ids with control or non-ASCII characters are not put on the wire."""
    pairs = rpc.error_metadata(Unavailable("x", good="ok", bad="caf\u00e9", worse="a\nb"))
    assert [("relay-id-good", "ok")] == [p for p in pairs if p[0].startswith("relay-id-")]


async def test_a_refusal_logs_one_event_with_reason_status_and_peer(stub, log_stream) -> None:
    """A RelayError is one warning `call_refused`; with no certificate the peer is insecure-dev."""
    await call(stub, "missing")
    [event] = logged(log_stream, "call_refused")
    assert (
        "warning",
        "Tokenize",
        "CARD_NOT_FOUND",
        "NOT_FOUND",
        "insecure-dev",
        {"card_ref": "missing"},
    ) == tuple(event.get(k) for k in ("level", "method", "reason", "status", "peer", "ids"))
    assert "peer_cert_sha256" not in event


async def test_an_internal_error_is_a_failure_not_a_refusal(stub, log_stream) -> None:
    """A crash keeps its rpc_failed line and logs no call_refused."""
    await call(stub, "crash")
    assert (1, []) == (
        len(logged(log_stream, "rpc_failed")),
        logged(log_stream, "call_refused"),
    )


async def test_bytes_that_are_no_request_are_invalid_argument_with_fixed_text(
    channel, hooked, log_stream
) -> None:
    """b"\\xff\\xff" to Tokenize: INVALID_ARGUMENT, the fixed message, reason, hook told."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary(TOKENIZE)(b"\xff\xff")
    metadata = dict(info.value.trailing_metadata() or ())
    assert (grpc.StatusCode.INVALID_ARGUMENT, rpc.UNPARSEABLE, "INVALID_REQUEST") == (
        info.value.code(),
        info.value.details(),
        metadata.get(rpc.REASON_KEY),
    )
    assert [("Tokenize", "INVALID_REQUEST")] == hooked
    assert ["Tokenize"] == [e["method"] for e in logged(log_stream, "call_refused")]


async def test_an_unparseable_stream_item_aborts_the_stream(channel, hooked, log_stream) -> None:
    """An item that does not parse ends the stream INVALID_ARGUMENT; one event, hook told."""
    call_ = channel.stream_stream(TOKENIZE_STREAM)(iter([b"\xff\xff"]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call_:
            pass
    assert (grpc.StatusCode.INVALID_ARGUMENT, [("TokenizeStream", "INVALID_REQUEST")]) == (
        info.value.code(),
        hooked,
    )
    assert ["INVALID_REQUEST"] == [e["reason"] for e in logged(log_stream, "call_refused")]


async def test_a_well_formed_request_reaches_the_servicer_as_its_message(stub, hooked) -> None:
    """Parsed by add_service, the request's fields arrive intact (here: the card_ref chosen)."""
    exc = await call(stub, "expired")
    assert (grpc.StatusCode.FAILED_PRECONDITION, []) == (exc.code(), hooked)
