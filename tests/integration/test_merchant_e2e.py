"""The three parties end to end on loopback: simulator, PciRelay and MerchantGateway over mTLS.

A merchant app calls the gateway through `relay.client.MerchantClient`; the gateway
creates Flex sessions, PciRelay tokenizes cards from its vault, and the PCI side's audit log is
the witness of how many tokenizations really happened (tests/integration/merchant_rig.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from relay.client import Outcome, Request, Token
from relay.errors import (
    CardNotFound,
    DeadlineExceeded,
    InvalidFieldSpec,
    InvalidRequest,
    RelayError,
    TokenNotFound,
    Unavailable,
)
from relay.flex.fields import CARD_NUMBER, FieldSpec
from relay.pb.v1 import merchant_gateway_pb2
from tests.cards_testdata import assert_no_test_pans
from tests.integration import merchant_rig as rig_fixtures
from tests.integration.conftest import CONTEXT_TTL, StartFlexSim, token_claims, token_header
from tests.integration.merchant_rig import GATEWAY_SERVICE, MakeMerchantRig, MerchantRig
from tests.integration.pci_rig import (
    BETA_ONLY,
    NETWORK_CARDS,
    UNKNOWN_CARD_REF,
    Rejection,
    SeededCard,
)

merchant_pki, merchant_flexsim, make_merchant_rig, postgres_ledger_url = (
    rig_fixtures.merchant_pki,
    rig_fixtures.merchant_flexsim,
    rig_fixtures.make_merchant_rig,
    rig_fixtures.postgres_ledger_url,
)

TOKEN_LIFETIME = 900
VISA = next(card for card in NETWORK_CARDS if card.vector.network == "Visa")
AMEX = next(card for card in NETWORK_CARDS if card.vector.network == "American Express")
BULK_SIZE = 500
SENT = [("started", ""), ("success", "")]
"""The audit outcomes of one tokenization: written ahead of the POST to Flex, then its success."""
DOWN_DEADLINE = 1.0
"""A caller's deadline while PciRelay is down: the gateway retries until it is spent."""


@dataclasses.dataclass(frozen=True)
class Facts:
    """What a token must say about its card: nothing but masked facts."""

    masked_pan: str
    bin: str
    card_type: str


def facts_of(card: SeededCard) -> Facts:
    """The masked PAN, BIN and card type Flex reports for a seeded card."""
    digits = card.vector.digits
    return Facts("X" * (len(digits) - 4) + digits[-4:], digits[:6], card.vector.card_type)


def token_facts(token: Token) -> Facts:
    """The masked facts the gateway returned with a token."""
    return Facts(token.masked_pan, token.bin, token.card_type)


def claim_facts(token: Token) -> Facts:
    """The masked facts inside the token's own claims."""
    card = token_claims(token.transient_token)["content"]["paymentInformation"]["card"]
    return Facts(card["number"]["maskedValue"], card["number"]["bin"], card["type"]["value"])


async def rejection_of(call: Any) -> Rejection:
    """The failure of a raw gateway call, checked for test PANs."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return Rejection.of(info.value)


def assert_clean(exc: RelayError) -> None:
    """A rebuilt error carries no test PAN in its message or ids."""
    assert_no_test_pans(f"{exc.message}\n\n\n{exc.ids!r}\n\n\n{exc!r}", "a relay error")


# --- Single requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("card", [VISA, AMEX], ids=lambda card: card.card_ref)
async def test_request_token_returns_the_cards_masked_facts(
    make_merchant_rig: MakeMerchantRig, card: SeededCard
) -> None:
    """A single request_token gives a 15-minute token whose facts and claims match the card."""
    rig = await make_merchant_rig()
    before = int(time.time())
    token = await rig.client.request_token(f"single-{card.card_ref}", card.card_ref, timeout=20)
    claims = token_claims(token.transient_token)
    header = token_header(token.transient_token)
    assert (f"single-{card.card_ref}", card.card_ref) == (token.request_id, token.card_ref)
    assert facts_of(card) == token_facts(token)
    assert facts_of(card) == claim_facts(token)
    assert ("RS256", 32) == (header["alg"], len(header["kid"]))
    assert token.jti == claims["jti"]
    assert int(token.expires_at.timestamp()) == claims["exp"]
    assert before + TOKEN_LIFETIME - 5 <= claims["exp"] <= int(time.time()) + TOKEN_LIFETIME + 5
    assert token == await rig.client.get_token(f"single-{card.card_ref}")
    audit = await rig.audit(f"single-{card.card_ref}")
    assert [("started", ""), ("success", token.jti)] == [(e.outcome, e.tt_jti) for e in audit]
    assert 1 == len({entry.cc_jti for entry in audit})


async def test_create_session_returns_a_live_capture_context(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """create_session gives a capture context whose jti and expiry are those of its claims."""
    rig = await make_merchant_rig()
    before = int(time.time())
    session = await rig.client.create_session()
    claims = token_claims(session.capture_context)
    assert (claims["jti"], claims["exp"]) == (session.jti, int(session.expires_at.timestamp()))
    assert before + CONTEXT_TTL - 5 <= claims["exp"] <= int(time.time()) + CONTEXT_TTL + 5
    assert session.jti != (await rig.client.create_session()).jti


# --- Idempotency ----------------------------------------------------------------------------------


async def test_concurrent_duplicates_tokenize_once(make_merchant_rig: MakeMerchantRig) -> None:
    """Ten concurrent calls with one request_id get one token, and PciRelay tokenized once."""
    rig = await make_merchant_rig()
    calls = [rig.client.request_token("dup-1", VISA.card_ref, timeout=20) for _ in range(10)]
    tokens = await asyncio.gather(*calls)
    assert 1 == len({token.jti for token in tokens})
    assert SENT == await rig.audit_outcomes("dup-1")
    assert tokens[0] == await rig.client.request_token("dup-1", VISA.card_ref, timeout=20)
    assert tokens[0] == await rig.client.get_token("dup-1")
    assert SENT == await rig.audit_outcomes("dup-1")


async def test_request_id_reused_for_another_card_is_refused(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """A recorded request_id asked again for another card is INVALID_ARGUMENT, not a new token."""
    rig = await make_merchant_rig()
    first = await rig.client.request_token("reuse-1", VISA.card_ref, timeout=20)
    with pytest.raises(InvalidRequest) as info:
        await rig.client.request_token("reuse-1", AMEX.card_ref, timeout=20)
    rejection = await rejection_of(
        rig.stub().RequestToken(
            merchant_gateway_pb2.TokenRequest(request_id="reuse-1", card_ref=AMEX.card_ref),
            timeout=20,
        )
    )
    assert (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST") == (
        rejection.code,
        rejection.reason,
    )
    assert grpc.StatusCode.INVALID_ARGUMENT == info.value.status
    assert first == await rig.client.get_token("reuse-1")
    assert SENT == await rig.audit_outcomes("reuse-1")


# --- Recovery -----------------------------------------------------------------------------------


async def test_expired_context_is_replaced_by_a_fresh_session(
    make_merchant_rig: MakeMerchantRig, flexsim_factory: StartFlexSim
) -> None:
    """A context that expires on its way to a slow PciRelay costs a fresh session, not the call."""
    sim = flexsim_factory("--context-ttl", "3")
    # exp is whole seconds, so a 3 s context lives 2 to 3 s: 3.5 s in the link outlasts it.
    rig = await make_merchant_rig(sim, pci_delay=3.5)
    token = await rig.client.request_token("expiry-1", VISA.card_ref, timeout=20)
    audit = await rig.audit("expiry-1")
    assert [("failure", "CAPTURE_CONTEXT_EXPIRED"), *SENT] == [
        (entry.outcome, entry.reason) for entry in audit
    ]
    assert token.jti == audit[2].tt_jti
    assert audit[0].cc_jti != audit[1].cc_jti == audit[2].cc_jti
    assert facts_of(VISA) == token_facts(token)


async def test_expired_contexts_on_a_stream_are_replaced_item_by_item(
    make_merchant_rig: MakeMerchantRig, flexsim_factory: StartFlexSim
) -> None:
    """On a stream whose PciRelay link is slow to start, each expired context is replaced."""
    sim = flexsim_factory("--context-ttl", "3")
    rig = await make_merchant_rig(sim, pci_delay=3.5)
    requests = [Request(f"expiry-s-{index}", NETWORK_CARDS[index].card_ref) for index in range(6)]
    outcomes = [o async for o in rig.client.request_tokens(requests, timeout=30)]
    assert {r.request_id: r.card_ref for r in requests} == {
        o.request_id: o.card_ref for o in outcomes if o.token is not None
    }
    assert [[("failure", "CAPTURE_CONTEXT_EXPIRED"), *SENT]] * 6 == [
        await rig.audit_outcomes(r.request_id) for r in requests
    ]


async def test_pci_side_down_is_unavailable_within_the_deadline(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """With nothing listening at PciRelay's address the caller gets OUTCOME_UNKNOWN in time."""
    with rig_fixtures.closed_port() as target:
        rig = await make_merchant_rig(pci_target=target)
        for _ in range(2):
            with pytest.raises((Unavailable, DeadlineExceeded)) as info:
                await rig.client.request_token("down-1", VISA.card_ref, timeout=DOWN_DEADLINE)
            # A unary call that failed without PciRelay's answer may have been tokenized there:
            # OUTCOME_UNKNOWN, or the caller's own deadline if the last try was still under way.
            assert (True, True) == (
                info.value.reason in {"OUTCOME_UNKNOWN", "DEADLINE_EXCEEDED"},
                info.value.retryable,
            )
            assert_clean(info.value)
        session = await rig.client.create_session(timeout=5)
        assert session.jti
        assert health_pb2.HealthCheckResponse.SERVING == await _health(rig, GATEWAY_SERVICE)
        with pytest.raises(TokenNotFound):
            await rig.client.get_token("down-1")


async def test_pci_side_down_fails_each_stream_item_alone(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """With PciRelay down every item of a stream is UNAVAILABLE, and the stream still ends."""
    with rig_fixtures.closed_port() as target:
        # Stream items have the gateway's default deadline, which its retries spend in full.
        rig = await make_merchant_rig(pci_target=target, default_deadline=DOWN_DEADLINE)
        requests = [Request(f"down-s-{index}", VISA.card_ref) for index in range(20)]
        outcomes = [o async for o in rig.client.request_tokens(requests, timeout=20)]
    # UNAVAILABLE if the item's write failed, OUTCOME_UNKNOWN if the call died after it, or
    # DEADLINE_EXCEEDED when the item's deadline ends while a try is still under way (a loaded
    # machine): each a retryable answer, none a token.
    assert sorted(r.request_id for r in requests) == sorted(o.request_id for o in outcomes)
    answers = {
        (o.error.status, o.error.retryable) if o.error else ("token", False) for o in outcomes
    }
    assert answers <= {
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
    }
    assert all(isinstance(o.error, Unavailable | DeadlineExceeded) for o in outcomes)
    reasons = {o.error.reason for o in outcomes if o.error}
    assert reasons <= {"UNAVAILABLE", "OUTCOME_UNKNOWN", "DEADLINE_EXCEEDED"}


async def test_hung_pci_side_costs_no_more_than_the_deadline(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """A PciRelay link that never answers ends in DEADLINE_EXCEEDED at the caller's deadline."""
    rig = await make_merchant_rig(pci_delay=60)
    started = time.monotonic()
    with pytest.raises(RelayError) as info:
        await rig.client.request_token("hung-1", VISA.card_ref, timeout=2)
    elapsed = time.monotonic() - started
    assert (grpc.StatusCode.DEADLINE_EXCEEDED, True) == (info.value.status, info.value.retryable)
    assert 1.5 < elapsed < 2.5
    assert [] == await rig.audit("hung-1")
    # The gateway still awaits an answer to what it sent (for the item's timeout and a grace),
    # and a stopping gateway waits for that: cut the link so the attempt ends unanswered now.
    assert rig.link is not None
    await rig.link.close()


# --- The ledger on PostgreSQL -------------------------------------------------------------------


async def test_replicas_sharing_a_postgres_ledger_tokenize_once(
    postgres_ledger_url: str, make_merchant_rig: MakeMerchantRig
) -> None:
    """Duplicates spread over two replicas on one PostgreSQL ledger make one tokenization."""
    rig = await make_merchant_rig(ledger_url=postgres_ledger_url)
    other = await rig.replica()
    clients = [rig.client, other.client]
    calls = [
        clients[index % 2].request_token("pg-dup-1", AMEX.card_ref, timeout=20)
        for index in range(10)
    ]
    tokens = await asyncio.gather(*calls)
    assert 1 == len({token.jti for token in tokens})
    assert SENT == await rig.audit_outcomes("pg-dup-1")
    assert tokens[0] == await other.client.get_token("pg-dup-1")
    assert tokens[0] == await rig.client.request_token("pg-dup-1", AMEX.card_ref, timeout=20)
    with pytest.raises(InvalidRequest):
        await other.client.request_token("pg-dup-1", VISA.card_ref, timeout=20)
    assert facts_of(AMEX) == token_facts(tokens[0])
    assert SENT == await rig.audit_outcomes("pg-dup-1")


# --- Errors reach the caller with their reason --------------------------------------------------


async def test_unknown_and_ungranted_cards_are_one_not_found(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """An unknown card_ref and an ungranted one both raise CardNotFound: NOT_FOUND, same text."""
    rig = await make_merchant_rig()
    with pytest.raises(CardNotFound) as unknown:
        await rig.client.request_token("err-unknown", UNKNOWN_CARD_REF, timeout=20)
    assert (grpc.StatusCode.NOT_FOUND, "CARD_NOT_FOUND") == (
        unknown.value.status,
        unknown.value.reason,
    )
    assert_clean(unknown.value)
    stub = rig.stub()
    rejections = [
        await rejection_of(
            stub.RequestToken(
                merchant_gateway_pb2.TokenRequest(request_id=f"err-raw-{ref}", card_ref=ref),
                timeout=20,
            )
        )
        for ref in (UNKNOWN_CARD_REF, BETA_ONLY.card_ref)
    ]
    assert [(grpc.StatusCode.NOT_FOUND, "CARD_NOT_FOUND")] * 2 == [
        (r.code, r.reason) for r in rejections
    ]
    assert rejections[0].details == rejections[1].details
    assert _without_ids(rejections[0]) == _without_ids(rejections[1])
    assert [("failure", "NOT_GRANTED")] == await rig.audit_outcomes(f"err-raw-{BETA_ONLY.card_ref}")


def _without_ids(rejection: Rejection) -> list[tuple[str, str]]:
    """Trailing metadata without the ids that name the request and the card_ref."""
    return [
        (key, value)
        for key, value in rejection.metadata
        if key not in {"relay-id-card-ref", "relay-id-request-id"}
    ]


async def test_unknown_field_path_is_invalid_field_spec(make_merchant_rig: MakeMerchantRig) -> None:
    """A field spec naming no Flex field is INVALID_ARGUMENT INVALID_FIELD_SPEC, before any work."""
    rig = await make_merchant_rig()
    fields = [FieldSpec(CARD_NUMBER), FieldSpec("paymentInformation.card.pin")]
    with pytest.raises(InvalidFieldSpec) as info:
        await rig.client.request_token("err-field", VISA.card_ref, fields, timeout=20)
    assert grpc.StatusCode.INVALID_ARGUMENT == info.value.status
    assert_clean(info.value)
    with pytest.raises(InvalidFieldSpec):
        await rig.client.create_session(fields)
    rejection = await rejection_of(
        rig.stub().RequestToken(
            merchant_gateway_pb2.TokenRequest(
                request_id="err-field-raw",
                card_ref=VISA.card_ref,
                fields=[{"path": "paymentInformation.card.pin", "required": True}],
            ),
            timeout=20,
        )
    )
    assert (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD_SPEC") == (
        rejection.code,
        rejection.reason,
    )
    assert [] == await rig.audit("err-field")


async def test_get_token_of_an_unknown_request_id_is_not_found(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """get_token of a request_id never tokenized is NOT_FOUND TOKEN_NOT_FOUND."""
    rig = await make_merchant_rig()
    with pytest.raises(TokenNotFound) as info:
        await rig.client.get_token("never-asked")
    assert (grpc.StatusCode.NOT_FOUND, "TOKEN_NOT_FOUND") == (info.value.status, info.value.reason)
    rejection = await rejection_of(
        rig.stub().GetToken(merchant_gateway_pb2.GetTokenRequest(request_id="never-asked"))
    )
    assert (grpc.StatusCode.NOT_FOUND, "TOKEN_NOT_FOUND") == (rejection.code, rejection.reason)


# --- Health and reflection ----------------------------------------------------------------------


async def _health(rig: MerchantRig, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(rig.channel())
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


async def test_gateway_reports_health_and_reflects_its_services(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """Health is SERVING for the server and MerchantGateway; reflection lists the service."""
    rig = await make_merchant_rig()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert [serving, serving] == [await _health(rig, name) for name in ("", GATEWAY_SERVICE)]
    stub = reflection_pb2_grpc.ServerReflectionStub(rig.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]
    names = {service.name for service in responses[0].list_services_response.service}
    assert {GATEWAY_SERVICE, "grpc.health.v1.Health"} <= names


# --- Streams -----------------------------------------------------------------------------------


async def test_stream_repeats_and_malformed_items_stay_per_item(
    make_merchant_rig: MakeMerchantRig,
) -> None:
    """On one stream a repeated request_id gets the one token made, a malformed item its error."""
    rig = await make_merchant_rig()
    requests = [
        Request("s-dup", VISA.card_ref),
        Request("s-bad", "not a card_ref!"),
        Request("s-dup", VISA.card_ref),
        Request("s-amex", AMEX.card_ref),
    ]
    outcomes = [o async for o in rig.client.request_tokens(requests, timeout=30)]
    seen = sorted(
        (o.request_id, o.token.jti if o.token else "", o.error.reason if o.error else "")
        for o in outcomes
    )
    dup = next(jti for rid, jti, _ in seen if rid == "s-dup")
    amex = next(jti for rid, jti, _ in seen if rid == "s-amex")
    expected = [
        ("s-amex", amex, ""),
        ("s-bad", "", "INVALID_REQUEST"),
        ("s-dup", dup, ""),
        ("s-dup", dup, ""),
    ]
    assert expected == seen
    assert all(jti for _, jti, reason in seen if not reason)
    assert SENT == await rig.audit_outcomes("s-dup")
    assert [] == await rig.audit("s-bad")


# --- Bulk ---------------------------------------------------------------------------------------


def bulk_requests(count: int) -> tuple[list[Request], dict[str, SeededCard | None]]:
    """count requests, mostly granted cards of every network, with unknown and ungranted ones."""
    requests: list[Request] = []
    cards: dict[str, SeededCard | None] = {}
    for index in range(count):
        granted = NETWORK_CARDS[index % len(NETWORK_CARDS)]
        card: SeededCard | None = granted
        card_ref = granted.card_ref
        if index % 50 == 7:
            card, card_ref = None, f"{UNKNOWN_CARD_REF}-{index}"
        elif index % 50 == 31:
            card, card_ref = None, BETA_ONLY.card_ref
        request_id = f"bulk-{index:04d}"
        requests.append(Request(request_id, card_ref))
        cards[request_id] = card
    return requests, cards


async def test_bulk_stream_of_500_tokenizes_each_request_once(
    make_merchant_rig: MakeMerchantRig, capsys: pytest.CaptureFixture[str]
) -> None:
    """500 requests on one stream: each outcome arrives once, errors stay per item, tokens match."""
    # The app's burst holds the whole stream: this measures the relay, not the app's rate limit.
    rig = await make_merchant_rig(app_burst=BULK_SIZE)
    requests, cards = bulk_requests(BULK_SIZE)
    started = time.perf_counter()
    outcomes: list[Outcome] = []
    arrived: list[float] = []
    async for outcome in rig.client.request_tokens(requests, timeout=120):
        outcomes.append(outcome)
        arrived.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    tokens = {o.request_id: o.token for o in outcomes if o.token is not None}
    errors = {o.request_id: o.error for o in outcomes if o.error is not None}
    assert Counter(list(cards)) == Counter(o.request_id for o in outcomes)
    assert {rid: card.card_ref for rid, card in cards.items() if card} == {
        o.request_id: o.card_ref for o in outcomes if o.token is not None
    }
    assert {rid: facts_of(card) for rid, card in cards.items() if card} == {
        rid: token_facts(token) for rid, token in tokens.items()
    }
    assert {rid: facts_of(card) for rid, card in cards.items() if card} == {
        rid: claim_facts(token) for rid, token in tokens.items()
    }
    assert {rid: token.jti for rid, token in tokens.items()} == {
        rid: token_claims(token.transient_token)["jti"] for rid, token in tokens.items()
    }
    assert {rid: ("CARD_NOT_FOUND", CardNotFound) for rid, card in cards.items() if not card} == {
        rid: (error.reason, type(error)) for rid, error in errors.items()
    }
    for error in errors.values():
        assert_clean(error)
    await _assert_bulk_audit(rig, requests, outcomes)
    with capsys.disabled():
        print(
            f"\nbulk: {len(outcomes)} outcomes ({len(tokens)} tokens) on one stream in "
            f"{elapsed:.2f} s: {len(tokens) / elapsed:.1f} TTs/s (first 100 outcomes in "
            f"{arrived[99]:.2f} s, last 100 in {arrived[-1] - arrived[-101]:.2f} s)"
        )


async def _assert_bulk_audit(
    rig: MerchantRig, requests: list[Request], outcomes: list[Outcome]
) -> None:
    """Per request the PCI audit log holds started and success (with the token) or the refusal."""
    wanted = {request.request_id for request in requests}
    stored = await rig.vault.audit_entries(limit=rig_fixtures.AUDIT_PAGE)
    audited: dict[str, list[tuple[str, str, str]]] = {}
    cc_jtis: dict[str, set[str]] = {}
    for row in reversed(stored):
        entry = row.entry
        if entry.request_id in wanted:
            audited.setdefault(entry.request_id, []).append(
                (entry.outcome, entry.tt_jti, entry.reason)
            )
            cc_jtis.setdefault(entry.request_id, set()).add(entry.cc_jti)
    ungranted = {o.request_id for o in outcomes if o.card_ref == BETA_ONLY.card_ref}
    expected = {
        o.request_id: [("started", "", ""), ("success", o.token.jti, "")]
        if o.token is not None
        else [("failure", "", "NOT_GRANTED" if o.request_id in ungranted else "CARD_NOT_FOUND")]
        for o in outcomes
    }
    assert expected == audited
    # Each started record pairs with its success: both under the same capture context.
    tokenized = {o.request_id for o in outcomes if o.token is not None}
    assert dict.fromkeys(tokenized, 1) == {rid: len(cc_jtis[rid]) for rid in tokenized}
    assert [] == await rig.vault.unfinished_attempts()
