"""PciRelay's per-item promises: a timeout drops an item unsent, a withdrawal too, a repeat under
the same capture context gets the first attempt's token, and an item already sent finishes."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import grpc
import pytest

from pci_side.tokenize import Tokenizer, TokenizeRequest
from pci_side.vault import AuditEntry, CardVault
from relay.flex.client import FlexClient, new_http_client
from relay.pb.v1 import pci_relay_pb2
from relay.ratelimit import Rate
from relay.receipts import ReceiptSigner
from tests.integration import pci_rig as rig_fixtures
from tests.integration.conftest import module_flexsim
from tests.integration.parties import wait_until
from tests.integration.pci_rig import MERCHANT, NETWORK_CARDS, MakePciRig

pci_pki, pci_flexsim, make_pci_rig = (
    rig_fixtures.pci_pki,
    rig_fixtures.pci_flexsim,
    rig_fixtures.make_pci_rig,
)

VISA = NETWORK_CARDS[0]
SLOW_MS = 1500
slow_tokens = module_flexsim("--fault-latency-ms", str(SLOW_MS), "--fault-paths", "tokens")


async def outcomes(vault: CardVault, request_id: str) -> list[AuditEntry]:
    """The audit records of request_id, oldest first, without the jtis."""
    rows = sorted(await vault.audit_entries(limit=1000), key=lambda row: row.seq)
    return [
        AuditEntry(e.merchant_id, e.card_ref, e.request_id, "", "", e.outcome, e.reason)
        for e in (row.entry for row in rows)
        if e.request_id == request_id
    ]


def entry(request_id: str, outcome: str, reason: str = "") -> AuditEntry:
    """What the audit says of one step of an attempt on VISA by MERCHANT."""
    return AuditEntry(MERCHANT, VISA.card_ref, request_id, "", "", outcome, reason)


def with_timeout(
    request: pci_relay_pb2.PciTokenizeRequest, seconds: float
) -> pci_relay_pb2.PciTokenizeRequest:
    """The request with its own timeout set."""
    request.timeout.FromTimedelta(dt.timedelta(seconds=seconds))
    return request


class Feed:
    """A TokenizeStream whose requests the test writes one at a time."""

    def __init__(self) -> None:
        """An empty queue; None ends the stream."""
        self.queue: asyncio.Queue[pci_relay_pb2.PciTokenizeRequest | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[pci_relay_pb2.PciTokenizeRequest]:
        """The requests as they are put."""
        while (item := await self.queue.get()) is not None:
            yield item


async def test_an_item_whose_timeout_passed_is_dropped_unsent(make_pci_rig: MakePciRig):
    """A zero timeout: DEADLINE_EXCEEDED, nothing sent, the attempt audited as such."""
    rig = await make_pci_rig()
    raw, _ = await rig.context()
    request = with_timeout(rig.request(VISA.card_ref, raw), 0)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await rig.stub().Tokenize(request)
    assert grpc.StatusCode.DEADLINE_EXCEEDED == refused.value.code()
    expected = [entry(request.request_id, "failure", "DEADLINE_EXCEEDED")]
    assert expected == await outcomes(rig.vault, request.request_id)


async def test_an_item_already_sent_finishes_past_the_call_deadline(
    make_pci_rig: MakePciRig, slow_tokens
):
    """The caller's deadline passes while Flex is slow: the attempt still ends in a success."""
    rig = await make_pci_rig(slow_tokens)
    raw, _ = await rig.context()
    request = rig.request(VISA.card_ref, raw)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await rig.stub().Tokenize(request, timeout=SLOW_MS / 3000)
    assert grpc.StatusCode.DEADLINE_EXCEEDED == late.value.code()
    expected = [entry(request.request_id, "started"), entry(request.request_id, "success")]

    async def finished() -> bool:
        return expected == await outcomes(rig.vault, request.request_id)

    await wait_until("the attempt's success record", finished)


async def test_a_repeat_under_the_same_context_gets_the_same_token(make_pci_rig: MakePciRig):
    """The same request and capture context twice: one tokenization, the same jti, a replay."""
    rig = await make_pci_rig()
    raw, _ = await rig.context()
    request = rig.request(VISA.card_ref, raw)
    first = await rig.stub().Tokenize(request)
    again = await rig.stub().Tokenize(request)
    assert first.token.jti == again.token.jti
    steps = ["started", "success", "replayed"]
    assert steps == [e.outcome for e in await outcomes(rig.vault, request.request_id)]


async def test_a_withdrawn_item_is_answered_withdrawn_and_never_sent(
    make_pci_rig: MakePciRig, slow_tokens
):
    """A withdrawal of an item still waiting for its turn drops it; the stream goes on."""
    rig = await make_pci_rig(slow_tokens, stream_concurrency=1)
    (raw_busy, _), (raw_queued, _) = await rig.contexts(2)
    busy = rig.request(VISA.card_ref, raw_busy)
    queued = rig.request(VISA.card_ref, raw_queued)
    feed = Feed()
    call = rig.stub().TokenizeStream(feed)
    for item in (busy, queued):
        feed.queue.put_nowait(item)
    withdrawal = pci_relay_pb2.PciTokenizeRequest(request_id=queued.request_id, withdraw=True)
    feed.queue.put_nowait(withdrawal)
    answers = {}
    async for result in call:
        answers[result.request_id] = result
        if len(answers) == 2:
            feed.queue.put_nowait(None)
    assert "token" == answers[busy.request_id].WhichOneof("outcome")
    withdrawn = answers[queued.request_id]
    assert ("CANCELLED", "WITHDRAWN") == (withdrawn.error.code, withdrawn.error.reason)
    # Withdrawn before its turn it left no record; withdrawn while being prepared, a failure.
    steps = [(e.outcome, e.reason) for e in await outcomes(rig.vault, queued.request_id)]
    assert set(steps) <= {("started", ""), ("failure", "WITHDRAWN")}
    assert ("failure", "WITHDRAWN") in steps or not steps


async def test_an_items_timeout_counts_from_its_arrival_not_its_turn(
    make_pci_rig: MakePciRig, slow_tokens
):
    """Behind a slow item on a one-at-a-time stream, a short timeout runs out while it waits."""
    rig = await make_pci_rig(slow_tokens, stream_concurrency=1)
    (raw_busy, _), (raw_short, _) = await rig.contexts(2)
    busy = rig.request(VISA.card_ref, raw_busy)
    short = with_timeout(rig.request(VISA.card_ref, raw_short), SLOW_MS / 10000)
    feed = Feed()
    for item in (busy, short, None):
        feed.queue.put_nowait(item)
    answers = {result.request_id: result async for result in rig.stub().TokenizeStream(feed)}
    assert "token" == answers[busy.request_id].WhichOneof("outcome")
    assert "DEADLINE_EXCEEDED" == answers[short.request_id].error.reason
    expected = [entry(short.request_id, "failure", "DEADLINE_EXCEEDED")]
    assert expected == await outcomes(rig.vault, short.request_id)


async def test_a_repeat_reaching_another_replica_gets_the_kept_token(make_pci_rig: MakePciRig):
    """Another PciRelay process on the same vault answers a flagged repeat with the kept token."""
    rig = await make_pci_rig()
    raw, _ = await rig.context()
    request = rig.request(VISA.card_ref, raw)
    first = await rig.stub().Tokenize(request)
    async with new_http_client(rig.config.flex) as http:
        # A replica of its own: its own Flex client and an empty map of running attempts.
        replica = Tokenizer(
            rig.vault,
            FlexClient(http, rig.config.flex),
            Rate(100, 100),
            receipts=ReceiptSigner(rig.config.receipt_key.get_secret_value()),
        )
        again = await replica.tokenize(
            MERCHANT, TokenizeRequest(request.request_id, raw, request.card_ref, repeat=True)
        )
    assert (first.token.jti, first.token.transient_token) == (again.jti, again.token)
    steps = ["started", "success", "replayed"]
    assert steps == [e.outcome for e in await outcomes(rig.vault, request.request_id)]
