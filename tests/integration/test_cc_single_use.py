"""One capture context releases at most one card, on every PciRelay replica, and the rate limit
of a merchant holds across replicas on a PostgreSQL vault.

Over real PciRelay servers (tests/integration/pci_rig.py) with capture contexts from the
simulator: a context used once is refused for any other request (same card, another card,
another merchant; unary and stream) with CAPTURE_CONTEXT_REUSED, and the refusal is audited. A
context whose card was never sent is given back. The request itself asking again gets the kept
token, the attempt's failure, or OUTCOME_UNKNOWN while neither is known: never a second release.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pci_side.presence import Presence
from pci_side.tokenize import Tokenizer, TokenizeRequest
from pci_side.vault import AuditEntry, CardVault, ContextUse, open_vault
from relay import rpc
from relay.config import VaultConfig
from relay.errors import (
    CaptureContextInvalid,
    CaptureContextReused,
    FlexRejected,
    OutcomeUnknown,
    RelayError,
    Unavailable,
)
from relay.flex.client import FlexClient, new_http_client
from relay.flex.models import CaptureContext
from relay.pb.v1 import pci_relay_pb2
from relay.ratelimit import Rate
from relay.receipts import ReceiptSigner
from tests.integration import pci_rig as rig_fixtures
from tests.integration.pci_rig import (
    BETA_ONLY,
    MERCHANT,
    NETWORK_CARDS,
    OTHER_MERCHANT,
    UNKNOWN_CARD_REF,
    MakePciRig,
    PciRig,
    Rejection,
)

pci_pki, pci_flexsim, make_pci_rig, pci_rig = (
    rig_fixtures.pci_pki,
    rig_fixtures.pci_flexsim,
    rig_fixtures.make_pci_rig,
    rig_fixtures.pci_rig,
)

VISA, MASTERCARD = NETWORK_CARDS[0], NETWORK_CARDS[1]
REUSED = "CAPTURE_CONTEXT_REUSED"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A failed call as the caller sees it, and the RelayError a client rebuilds from it."""

    code: grpc.StatusCode
    reason: str
    error: RelayError


async def rejection(call: Any) -> Refusal:
    """The status of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    seen = Rejection.of(caught.value)  # also scans it for test PANs
    return Refusal(seen.code, seen.reason, rpc.error_from_rpc(caught.value))


async def audit_failures(vault: CardVault, reason: str) -> list[AuditEntry]:
    """The failure records with this reason, oldest first."""
    entries = [stored.entry for stored in await vault.audit_entries(limit=200)]
    return [e for e in entries[::-1] if e.outcome == "failure" and e.reason == reason]


def repeat_of(request: pci_relay_pb2.PciTokenizeRequest) -> pci_relay_pb2.PciTokenizeRequest:
    """The same request, flagged as sent before without an answer."""
    again = pci_relay_pb2.PciTokenizeRequest()
    again.CopyFrom(request)
    again.repeat = True
    return again


@pytest.mark.parametrize(
    ("second_merchant", "second_card", "second_request_id"),
    [
        (MERCHANT, VISA.card_ref, "r-other-request"),
        (MERCHANT, MASTERCARD.card_ref, "r-1"),
        (OTHER_MERCHANT, BETA_ONLY.card_ref, "r-1"),
    ],
    ids=["same-card-other-request", "other-card-same-merchant", "other-merchant"],
)
async def test_a_used_context_is_refused_for_any_other_request(
    pci_rig: PciRig, second_merchant: str, second_card: str, second_request_id: str
):
    """The first request gets a token; any other request under its context is refused, audited."""
    raw, ctx = await pci_rig.context()
    first = await pci_rig.stub().Tokenize(pci_rig.request(VISA.card_ref, raw, "r-1"))
    assert first.HasField("token")
    replay = pci_rig.request(second_card, raw, second_request_id)
    refused = await rejection(pci_rig.stub(second_merchant).Tokenize(replay))
    assert (grpc.StatusCode.FAILED_PRECONDITION, REUSED) == (refused.code, refused.reason)
    assert isinstance(refused.error, CaptureContextReused)
    audited = await audit_failures(pci_rig.vault, REUSED)
    assert [(second_merchant, second_card, second_request_id, ctx.jti)] == [
        (e.merchant_id, e.card_ref, e.request_id, e.cc_jti) for e in audited
    ]


async def test_a_used_context_is_refused_on_a_stream_too(pci_rig: PciRig):
    """Two items of one stream under one context: one token, one per-item CAPTURE_CONTEXT_REUSED."""
    raw, _ = await pci_rig.context()
    requests = [
        pci_rig.request(VISA.card_ref, raw, "s-1"),
        pci_rig.request(MASTERCARD.card_ref, raw, "s-2"),
    ]
    results = [result async for result in pci_rig.stub().TokenizeStream(iter(requests))]
    outcomes = sorted("token" if r.HasField("token") else r.error.reason for r in results)
    assert ["CAPTURE_CONTEXT_REUSED", "token"] == outcomes


async def test_a_context_used_on_one_stream_is_refused_on_another(pci_rig: PciRig):
    """The record is in the vault, not in the stream: a second stream is refused as well."""
    raw, _ = await pci_rig.context()
    first = [pci_rig.request(VISA.card_ref, raw, "s-1")]
    [answer] = [r async for r in pci_rig.stub().TokenizeStream(iter(first))]
    assert answer.HasField("token")
    second = [pci_rig.request(VISA.card_ref, raw, "s-2")]
    [refused] = [r async for r in pci_rig.stub().TokenizeStream(iter(second))]
    assert REUSED == refused.error.reason


async def test_a_context_whose_card_was_never_sent_is_given_back(pci_rig: PciRig):
    """A refusal before the card left frees the context: the next request under it succeeds."""
    raw, _ = await pci_rig.context()
    refused = await rejection(
        pci_rig.stub().Tokenize(pci_rig.request(UNKNOWN_CARD_REF, raw, "r-unknown"))
    )
    assert "CARD_NOT_FOUND" == refused.reason
    result = await pci_rig.stub().Tokenize(pci_rig.request(VISA.card_ref, raw, "r-visa"))
    assert result.HasField("token")


def held_by(
    holder: str, request: pci_relay_pb2.PciTokenizeRequest, ctx: CaptureContext
) -> ContextUse:
    """The use another replica's attempt would have claimed for request."""
    return ContextUse(
        ctx.jti, MERCHANT, "", request.request_id, request.card_ref, ctx.expires_at, holder
    )


async def test_the_request_itself_repeated_while_unresolved_is_outcome_unknown(pci_rig: PciRig):
    """Claimed by a live replica, unfinished: a repeat may not send again, nor a non-repeat."""
    raw, ctx = await pci_rig.context()
    request = pci_rig.request(VISA.card_ref, raw, "r-elsewhere")
    await pci_rig.vault.beat("pci-alive-elsewhere")
    assert await pci_rig.vault.claim_context(held_by("pci-alive-elsewhere", request, ctx)) is None
    unresolved = await rejection(pci_rig.stub().Tokenize(repeat_of(request)))
    assert (grpc.StatusCode.UNAVAILABLE, "OUTCOME_UNKNOWN") == (
        unresolved.code,
        unresolved.reason,
    )
    assert isinstance(unresolved.error, OutcomeUnknown)
    again = await rejection(pci_rig.stub().Tokenize(request))
    assert REUSED == again.reason


async def test_a_context_held_by_a_dead_replica_is_taken_over_by_the_requests_repeat(
    pci_rig: PciRig,
):
    """Its holder never beat (it died): the repeat of the same request gets its token."""
    raw, ctx = await pci_rig.context()
    request = pci_rig.request(VISA.card_ref, raw, "r-orphaned")
    assert await pci_rig.vault.claim_context(held_by("pci-dead", request, ctx)) is None
    other = await rejection(pci_rig.stub().Tokenize(pci_rig.request(VISA.card_ref, raw, "r-x")))
    assert REUSED == other.reason  # a dead holder frees the context for its request only
    result = await pci_rig.stub().Tokenize(repeat_of(request))
    assert result.HasField("token")


async def test_the_request_itself_repeated_after_a_failure_gets_that_failure(pci_rig: PciRig):
    """The card was sent and Flex refused it: a repeat learns that, and nothing is sent again."""
    raw, ctx = await pci_rig.context()
    request = pci_rig.request(VISA.card_ref, raw, "r-failed")
    assert await pci_rig.vault.claim_context(held_by("pci-dead", request, ctx)) is None
    await pci_rig.vault.fail_context(ctx.jti, FlexRejected.reason)
    failed = await rejection(pci_rig.stub().Tokenize(repeat_of(request)))
    assert "FLEX_REJECTED" == failed.reason
    assert isinstance(failed.error, FlexRejected)


# --- across replicas: the vault's database decides -----------------------------------------------


@pytest.fixture
async def two_vaults(vault_config: VaultConfig) -> AsyncIterator[tuple[CardVault, CardVault]]:
    """Two handles on one vault, as two replicas have (each its own connections)."""
    async with await open_vault(vault_config) as one, await open_vault(vault_config) as two:
        yield one, two


async def test_one_claim_wins_when_replicas_race_for_a_context(
    two_vaults: tuple[CardVault, CardVault],
):
    """Twenty requests on two replicas claim one jti at once: exactly one gets it."""
    uses = [
        ContextUse("cc-raced", MERCHANT, "", f"r-{i}", VISA.card_ref, 2_000_000_000, f"pci-{i % 2}")
        for i in range(20)
    ]
    held = await asyncio.gather(
        *(two_vaults[i % 2].claim_context(use) for i, use in enumerate(uses))
    )
    winners = [use for use, holder in zip(uses, held, strict=True) if holder is None]
    assert 1 == len(winners)
    assert all(holder == winners[0] for holder in held if holder is not None)


async def test_a_merchants_rate_holds_across_two_replicas_on_postgresql(
    make_pci_rig: MakePciRig, postgres_vault_config: VaultConfig
):
    """Burst 3 and no refill to speak of: three calls pass over both replicas, not six."""
    replicas = [
        await make_pci_rig(rate_per_second=0.0001, rate_burst=3, vault_config=postgres_vault_config)
        for _ in range(2)
    ]
    reasons = []
    for i in range(8):
        rig = replicas[i % 2]
        request = rig.request(VISA.card_ref, "not-a-capture-context", f"r-rate-{i}")
        reasons.append((await rejection(rig.stub().Tokenize(request))).reason)
    passed = [reason for reason in reasons if reason != "RATE_LIMITED"]
    assert [CaptureContextInvalid.reason] * 3 == passed


async def test_one_claim_wins_within_one_replicas_batch(two_vaults: tuple[CardVault, CardVault]):
    """Claims arriving together share a transaction: one jti in it twice still has one winner."""
    vault = two_vaults[0]
    uses = [
        ContextUse("cc-batched", MERCHANT, "", f"r-{i}", VISA.card_ref, 2_000_000_000, "pci-0")
        for i in range(10)
    ]
    held = await asyncio.gather(*(vault.claim_context(use) for use in uses))
    assert 1 == held.count(None)
    winner = uses[held.index(None)]
    assert [winner] * 9 == [holder for holder in held if holder is not None]
    fresh = ContextUse("cc-fresh", MERCHANT, "", "r-0", VISA.card_ref, 2_000_000_000, "pci-0")
    assert [None, winner] == await asyncio.gather(
        vault.claim_context(fresh), vault.claim_context(uses[0])
    )


async def test_a_replica_out_of_touch_with_the_vault_sends_nothing(pci_rig: PciRig):
    """No beat got through lately: the card is not sent, and the context is given back."""
    silent = Presence(pci_rig.vault, "pci-silent")  # never entered: it never beat
    async with new_http_client(pci_rig.config.flex) as http:
        tokenizer = Tokenizer(
            pci_rig.vault,
            FlexClient(http, pci_rig.config.flex),
            Rate(100, 100),
            receipts=ReceiptSigner(pci_rig.config.receipt_key.get_secret_value()),
            presence=silent,
        )
        raw, ctx = await pci_rig.context()
        with pytest.raises(Unavailable):
            await tokenizer.tokenize(MERCHANT, TokenizeRequest("r-silent", raw, VISA.card_ref))
    [stored] = await pci_rig.vault.audit_entries(limit=1)
    assert ("failure", "UNAVAILABLE", ctx.jti) == (
        stored.entry.outcome,
        stored.entry.reason,
        stored.entry.cc_jti,
    )
    result = await pci_rig.stub().Tokenize(pci_rig.request(VISA.card_ref, raw, "r-live"))
    assert result.HasField("token")  # the context was given back, unsent
