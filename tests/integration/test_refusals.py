"""Every refusal is a structured event naming the peer; at PciRelay, one before the tokenizer is
also a `refused` audit record; gRPC C-core's own lines reach stderr only as JSON events."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import rpc
from relay.dev import tlsgen
from relay.dev.procs import Child
from relay.errors import CardNotFound, InvalidRequest, PermissionDenied
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc, pci_relay_pb2_grpc
from tests.integration import merchant_rig as merchant_fixtures
from tests.integration import pci_rig as rig_fixtures
from tests.integration.conftest import FlexSim
from tests.integration.merchant_rig import APP, MakeMerchantRig
from tests.integration.parties import events, wait_until
from tests.integration.pci_rig import (
    MERCHANT,
    NETWORK_CARDS,
    PciRig,
    Rejection,
    RigPKI,
    pci_serve_env,
)
from tests.vault_backends import make_vault_config

pci_pki, pci_flexsim, make_pci_rig, pci_rig = (
    rig_fixtures.pci_pki,
    rig_fixtures.pci_flexsim,
    rig_fixtures.make_pci_rig,
    rig_fixtures.pci_rig,
)
merchant_pki, merchant_flexsim, make_merchant_rig = (
    merchant_fixtures.merchant_pki,
    merchant_fixtures.merchant_flexsim,
    merchant_fixtures.make_merchant_rig,
)

VISA = NETWORK_CARDS[0]
TOKENIZE = "/relay.pb.v1.PciRelay/Tokenize"
TOKENIZE_STREAM = "/relay.pb.v1.PciRelay/TokenizeStream"
GARBAGE = b"\xff\xff"


def refusals(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The call_refused events written so far (stderr at the descriptor level)."""
    return events(capfd.readouterr().err.splitlines(), "call_refused")


def brief(event: dict[str, Any]) -> tuple[Any, ...]:
    """What a refusal event says: method, reason, status, peer and certificate digest."""
    return tuple(event.get(k) for k in ("method", "reason", "status", "peer", "peer_cert_sha256"))


def fingerprint(issued: tlsgen.Issued) -> str:
    """Hex SHA-256 of a certificate's DER bytes."""
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_without_san(ca: tlsgen.Issued) -> tlsgen.Issued:
    """A client certificate from the rig's CA that names no one in a SAN (only a CN)."""
    return tlsgen.issue_nameless_client(ca, MERCHANT)


async def refused_call(call: Any) -> Rejection:
    """The rejection a call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return Rejection.of(info.value)


async def audit(rig: PciRig) -> list[tuple[str, str, str, str]]:
    """(outcome, reason, actor, request_id) of each audit record, oldest first."""
    rows = sorted(await rig.vault.audit_entries(limit=1000), key=lambda row: row.seq)
    return [(r.entry.outcome, r.entry.reason, r.entry.actor, r.entry.request_id) for r in rows]


def me(rig: PciRig) -> tuple[str, str]:
    """The peer and certificate digest of the rig's default merchant."""
    return f"merchant:{MERCHANT}", fingerprint(rig.pki.client(MERCHANT))


# --- refusals at PciRelay ----------------------------------------------------------------------


async def test_a_certificate_without_the_san_is_refused_logged_and_audited(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """PERMISSION_DENIED: one event naming the certificate by its digest, one refused record."""
    nameless = cert_without_san(pci_rig.pki.ca)
    channel = pci_rig.channel(credentials=pci_rig.pki.credentials(client=nameless))
    stub = pci_relay_pb2_grpc.PciRelayStub(channel)
    rejection = await refused_call(stub.Tokenize(pci_rig.request(VISA.card_ref, "cc")))
    digest = fingerprint(nameless)
    assert (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied.reason) == (
        rejection.code,
        rejection.reason,
    )
    expected = ("Tokenize", "PERMISSION_DENIED", "PERMISSION_DENIED", f"sha256:{digest}", digest)
    assert [expected] == [brief(e) for e in refusals(capfd)]
    assert [("refused", "PERMISSION_DENIED", f"sha256:{digest}", "")] == await audit(pci_rig)


async def test_a_bad_request_id_is_refused_logged_and_audited_as_a_failure(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """INVALID_REQUEST inside the tokenizer: an event with the peer, a `failure` record."""
    stub = pci_rig.stub()
    request = pci_rig.request(VISA.card_ref, "cc", request_id="has a space")
    rejection = await refused_call(stub.Tokenize(request))
    peer, digest = me(pci_rig)
    assert (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest.reason) == (
        rejection.code,
        rejection.reason,
    )
    expected = ("Tokenize", "INVALID_REQUEST", "INVALID_ARGUMENT", peer, digest)
    assert [expected] == [brief(e) for e in refusals(capfd)]
    # The invalid request_id itself is kept out of the chain: ids are recorded only if valid.
    assert [("failure", "INVALID_REQUEST", "")] == [
        (outcome, reason, request_id) for outcome, reason, _, request_id in await audit(pci_rig)
    ]


async def test_an_unknown_card_is_refused_and_logged_once_with_the_peer(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """CARD_NOT_FOUND: one event; the tokenizer's own record, no extra `refused` one."""
    raw, _ = await pci_rig.context()
    request = pci_rig.request("no-such-card", raw, request_id="r-missing")
    rejection = await refused_call(pci_rig.stub().Tokenize(request))
    peer, digest = me(pci_rig)
    assert (grpc.StatusCode.NOT_FOUND, CardNotFound.reason) == (rejection.code, rejection.reason)
    expected = ("Tokenize", "CARD_NOT_FOUND", "NOT_FOUND", peer, digest)
    assert [expected] == [brief(e) for e in refusals(capfd)]
    assert ["failure"] == [outcome for outcome, *_ in await audit(pci_rig)]


async def test_an_unparseable_request_is_invalid_argument_logged_and_audited(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """Raw bytes that are no request: INVALID_ARGUMENT, the fixed text, no parser class name."""
    tokenize = pci_rig.channel().unary_unary(TOKENIZE)
    rejection = await refused_call(tokenize(GARBAGE, timeout=10))
    peer, digest = me(pci_rig)
    assert (grpc.StatusCode.INVALID_ARGUMENT, rpc.UNPARSEABLE, "INVALID_REQUEST") == (
        rejection.code,
        rejection.details,
        rejection.reason,
    )
    assert "Error" not in rejection.details
    expected = ("Tokenize", "INVALID_REQUEST", "INVALID_ARGUMENT", peer, digest)
    assert [expected] == [brief(e) for e in refusals(capfd)]
    assert [("refused", "INVALID_REQUEST", peer, "")] == await audit(pci_rig)


async def test_an_unparseable_stream_item_aborts_the_stream_and_is_audited(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """A stream item that does not parse ends the stream INVALID_ARGUMENT, logged and audited."""
    stream = pci_rig.channel().stream_stream(TOKENIZE_STREAM)
    call = stream(iter([GARBAGE]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    rejection = Rejection.of(info.value)
    peer, _ = me(pci_rig)
    assert (grpc.StatusCode.INVALID_ARGUMENT, rpc.UNPARSEABLE) == (
        rejection.code,
        rejection.details,
    )
    assert [("TokenizeStream", "INVALID_REQUEST")] == [
        (e["method"], e["reason"]) for e in refusals(capfd)
    ]
    assert [("refused", "INVALID_REQUEST", peer, "")] == await audit(pci_rig)


async def test_a_per_item_error_is_one_event_and_a_success_logs_none(
    pci_rig: PciRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """On one stream, the refused item logs call_refused; the tokenized one logs no refusal."""
    (good, _), (bad, _) = await pci_rig.contexts(2)
    requests = [
        pci_rig.request(VISA.card_ref, good, request_id="ok-1"),
        pci_rig.request("no-such-card", bad, request_id="missing-1"),
    ]
    results = [r async for r in pci_rig.stub().TokenizeStream(iter(requests), timeout=30)]
    peer, digest = me(pci_rig)
    assert {"ok-1": "token", "missing-1": "error"} == {
        r.request_id: r.WhichOneof("outcome") for r in results
    }
    expected = ("TokenizeStream", "CARD_NOT_FOUND", "NOT_FOUND", peer, digest)
    assert [expected] == [brief(e) for e in refusals(capfd)]


# --- refusals at the MerchantGateway ------------------------------------------------------------


async def test_the_gateway_refuses_unparseable_bytes_and_bad_stream_items_with_events(
    make_merchant_rig: MakeMerchantRig, capfd: pytest.CaptureFixture[str]
) -> None:
    """The gateway registers through relay.rpc too: same fixed refusal, same events, its peer."""
    rig = await make_merchant_rig()
    channel = rig.channel()
    rejection = await refused_call(
        channel.unary_unary("/relay.pb.v1.MerchantGateway/RequestToken")(GARBAGE, timeout=10)
    )
    bad = merchant_gateway_pb2.TokenRequest(request_id="has a space", card_ref=VISA.card_ref)
    stub = merchant_gateway_pb2_grpc.MerchantGatewayStub(channel)
    results = [r async for r in stub.RequestTokens(iter([bad]), timeout=30)]
    assert (grpc.StatusCode.INVALID_ARGUMENT, rpc.UNPARSEABLE) == (
        rejection.code,
        rejection.details,
    )
    assert ["INVALID_REQUEST"] == [r.error.reason for r in results]
    seen = [(e["method"], e["reason"], e["peer"]) for e in refusals(capfd)]
    app = next(peer for _, _, peer in seen)
    assert app.endswith(f":{APP}")
    assert [
        ("RequestToken", "INVALID_REQUEST", app),
        ("RequestTokens", "INVALID_REQUEST", app),
    ] == seen


# --- gRPC C-core's own lines -------------------------------------------------------------------


@pytest.fixture
async def pci_child(pci_flexsim: FlexSim, pci_pki: RigPKI, tmp_path: Path) -> Any:
    """A `relay pci serve` child over mTLS; stopped (exit 0 expected) after the test."""
    vault = make_vault_config(f"sqlite:///{tmp_path / 'vault.db'}", tmp_path)
    env = pci_serve_env(pci_flexsim, pci_pki, vault, tmp_path)
    env.pop("GRPC_VERBOSITY", None)
    child = await Child.start("pci", ["pci", "serve"], ready_event="pci_listening", env=env)
    yield child
    assert 0 == await child.stop(), child.lines[-3:]


async def test_tls_handshake_refusals_are_json_events_and_stderr_holds_nothing_else(
    pci_child: Child, pci_pki: RigPKI
) -> None:
    """A rogue CA's client and a plaintext client: tls_handshake_refused lines, all JSON."""
    target = f"127.0.0.1:{pci_child.ready.result()['port']}"
    rogue = tlsgen.issue_client(tlsgen.new_ca("rogue CA"), MERCHANT)
    channels = [
        grpc.aio.secure_channel(target, pci_pki.credentials(client=rogue)),
        grpc.aio.insecure_channel(target),
    ]
    for count, channel in enumerate(channels, start=1):
        async with channel:
            tokenize = channel.unary_unary(TOKENIZE)
            rejection = await refused_call(tokenize(GARBAGE, timeout=10))
            assert grpc.StatusCode.UNAVAILABLE == rejection.code

        def logged(count: int = count) -> bool:
            return len(events(pci_child.lines, "tls_handshake_refused")) >= count

        await wait_until(f"{count} tls_handshake_refused lines", logged)
    await pci_child.stop()
    refused = events(pci_child.lines, "tls_handshake_refused")
    assert ["warning", "warning"] == [e["level"] for e in refused]
    assert all("Handshake failed" in e["detail"] for e in refused)
    assert [] == [line for line in pci_child.lines if not _is_json_object(line)]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
