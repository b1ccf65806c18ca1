"""A request_id is tokenized at most once through abandoned streams, kills, drains and restarts.

Every party is a real `relay` process (tests/integration/parties.py). Tokenizations are counted
from the audit chain (one `success` record per tokenization), and each test also checks that
the token a caller finally got is the one recorded there.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.integration import merchant_rig
from tests.integration.conftest import StartFlexSim
from tests.integration.parties import (
    Bulk,
    Parties,
    events,
    issued_jti,
    kill,
    port_of,
    request,
    successes,
    wait_until,
)
from tests.vault_backends import postgres_schema

pytestmark = pytest.mark.timeout(300)
postgres_ledger_url = merchant_rig.postgres_ledger_url

TOKENS = ("--fault-paths", "tokens")


@pytest.fixture
def postgres_vault_url(postgres_database: str) -> Iterator[str]:
    """A vault URL on a fresh schema of the run's PostgreSQL database."""
    with postgres_schema(postgres_database) as url:
        yield url


def items(parties: Parties, prefix: str, count: int) -> list:  # type: ignore[type-arg]
    """count requests spread over the seeded cards."""
    refs = parties.card_refs
    return [request(f"{prefix}-{i:03d}", refs[i % len(refs)]) for i in range(count)]


def sqlite_ledger(tmp_path: Path) -> str:
    """A durable ledger file of the test's own."""
    return f"sqlite:///{tmp_path}/ledger.db"


async def started(parties: Parties, at_least: int) -> bool:
    """Whether at least that many attempts have been sent to Flex (started records)."""
    rows = await parties.audit()
    return sum(row.entry.outcome == "started" for row in rows) >= at_least


def assert_once_each(rows: list, answered: dict[str, str], ids: list[str]) -> None:  # type: ignore[type-arg]
    """Each id has exactly one tokenization, and the caller holds exactly that token."""
    counts = successes(rows)
    assert dict.fromkeys(ids, 1) == {rid: counts[rid] for rid in ids}
    recorded = issued_jti(rows)
    assert {rid: recorded[rid] for rid in ids} == {rid: answered[rid] for rid in ids}


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
async def test_an_abandoned_stream_and_its_retry_tokenize_each_id_once(
    ledger: str, tmp_path: Path, flexsim_factory: StartFlexSim, request: pytest.FixtureRequest
):
    """A caller leaves mid-stream while Flex is slow; its retry gets the tokens already issued."""
    sim = flexsim_factory("--fault-latency-ms", "1500", *TOKENS)
    ledger_url = (
        sqlite_ledger(tmp_path)
        if ledger == "sqlite"
        else request.getfixturevalue("postgres_ledger_url")
    )
    parties = await Parties.create(tmp_path, sim)
    try:
        pci = await parties.start_pci()
        gateway = await parties.start_gateway(port_of(pci), ledger_url=ledger_url)
        stub = parties.gateway(gateway)
        batch = items(parties, "abandon", 40)
        first = Bulk(stub)
        first.send(batch)
        await wait_until("attempts sent to Flex", lambda: started(parties, 5))
        first.cancel()
        retry = Bulk(stub)
        retry.send(batch)
        assert grpc.StatusCode.OK == await retry.finish()
        ids = [item.request_id for item in batch]
        assert {""} == set(retry.reasons())
        assert_once_each(await parties.audit(), retry.tokens(), ids)
        assert [] == await parties.unfinished()
    finally:
        await parties.stop_all()


@pytest.mark.parametrize("vault", ["sqlite", "postgresql"])
async def test_pci_killed_after_flex_issued_leaves_evidence_and_no_duplicate(
    vault: str, tmp_path: Path, flexsim_factory: StartFlexSim, request: pytest.FixtureRequest
):
    """kill -9 of PciRelay while Flex holds issued tokens: started records, then one token each."""
    sim = flexsim_factory("--fault-hold-after-issue-ms", "2000")
    vault_url = None if vault == "sqlite" else request.getfixturevalue("postgres_vault_url")
    parties = await Parties.create(tmp_path, sim, vault_url=vault_url)
    try:
        pci = await parties.start_pci()
        port = port_of(pci)
        gateway = await parties.start_gateway(port, ledger_url=sqlite_ledger(tmp_path))
        batch = items(parties, "crash", 20)
        bulk = Bulk(parties.gateway(gateway))
        bulk.send(batch)
        await wait_until("a token issued by Flex", lambda: sim.events("flexsim_token_issued"))
        kill(pci)
        await pci.process.wait()
        issued_to_the_dead = len(sim.events("flexsim_token_issued"))
        # Every card that reached Flex has its started record, with no outcome, and the
        # operator's command lists them (exit 1: there are some).
        unfinished = await parties.unfinished()
        assert len(unfinished) >= issued_to_the_dead
        code, listed = await parties.cards("audit", "unfinished")
        expected = [(1, row.entry.request_id, row.entry.cc_jti) for row in unfinished]
        lines = [json.loads(line) for line in listed.splitlines()]
        assert expected == [(code, line["request_id"], line["cc_jti"]) for line in lines]
        await parties.start_pci(port=port)
        assert grpc.StatusCode.OK == await bulk.finish()
        assert {""} == set(bulk.reasons())
        rows = await parties.audit()
        assert_once_each(rows, bulk.tokens(), [item.request_id for item in batch])
    finally:
        await parties.stop_all()


async def test_a_killed_gateway_hands_its_ids_to_the_survivor(
    tmp_path: Path, flexsim_factory: StartFlexSim, postgres_ledger_url: str
):
    """Two gateways share a PostgreSQL ledger; one is killed; the other finishes its ids once."""
    sim = flexsim_factory("--fault-latency-ms", "1000", *TOKENS)
    parties = await Parties.create(tmp_path, sim)
    try:
        pci = await parties.start_pci()
        doomed = await parties.start_gateway(port_of(pci), ledger_url=postgres_ledger_url)
        survivor = await parties.start_gateway(port_of(pci), ledger_url=postgres_ledger_url)
        batch = items(parties, "failover", 30)
        Bulk(parties.gateway(doomed)).send(batch)
        await wait_until("attempts sent to Flex", lambda: started(parties, 5))
        kill(doomed)
        killed_at = time.monotonic()
        bulk = Bulk(parties.gateway(survivor))
        bulk.send(batch)
        assert grpc.StatusCode.OK == await bulk.finish()
        takeover = time.monotonic() - killed_at
        assert {""} == set(bulk.reasons())
        assert_once_each(await parties.audit(), bulk.tokens(), [item.request_id for item in batch])
        print(f"survivor finished the dead replica's ids {takeover:.2f} s after the kill")
    finally:
        await parties.stop_all()


async def test_a_drained_gateway_answers_every_item_and_its_successor_replays(
    tmp_path: Path, flexsim_factory: StartFlexSim
):
    """SIGTERM mid-stream answers every item and exits 0; a restart on the ledger replays."""
    sim = flexsim_factory("--fault-latency-ms", "300", *TOKENS)
    parties = await Parties.create(tmp_path, sim)
    try:
        pci = await parties.start_pci()
        ledger_url = sqlite_ledger(tmp_path)
        gateway = await parties.start_gateway(port_of(pci), ledger_url=ledger_url)
        batch = items(parties, "drain", 60)
        bulk = Bulk(parties.gateway(gateway))
        bulk.send(batch[:30])
        await wait_until("the first answers", lambda: len(bulk.answers) >= 5)
        gateway.process.send_signal(signal.SIGTERM)
        await wait_until("the drain", lambda: events(gateway.lines, "merchant_draining"))
        bulk.send(batch[30:])
        await bulk.finish()
        assert bulk.sent == len(bulk.answers)
        assert set(bulk.reasons()) <= {"", "UNAVAILABLE"}
        assert 0 == await gateway.process.wait()
        successor = await parties.start_gateway(port_of(pci), ledger_url=ledger_url)
        retry = Bulk(parties.gateway(successor))
        retry.send(batch)
        assert grpc.StatusCode.OK == await retry.finish()
        before = bulk.tokens()
        assert before == {rid: retry.tokens()[rid] for rid in before}
        assert_once_each(await parties.audit(), retry.tokens(), [i.request_id for i in batch])
    finally:
        await parties.stop_all()


async def test_a_pci_restart_of_3_seconds_fails_no_item(
    tmp_path: Path, flexsim_factory: StartFlexSim
):
    """PciRelay drains and comes back 3 s later on its port: every item still gets its token."""
    sim = flexsim_factory("--fault-latency-ms", "200", *TOKENS)
    parties = await Parties.create(tmp_path, sim)
    try:
        pci = await parties.start_pci()
        port = port_of(pci)
        gateway = await parties.start_gateway(port, ledger_url=sqlite_ledger(tmp_path))
        batch = items(parties, "restart", 40)
        bulk = Bulk(parties.gateway(gateway))
        bulk.send(batch)
        await wait_until("the first answers", lambda: len(bulk.answers) >= 3)
        assert 0 == await pci.stop()
        await asyncio.sleep(3)  # the outage itself, not a synchronisation
        await parties.start_pci(port=port)
        assert grpc.StatusCode.OK == await bulk.finish()
        assert {""} == set(bulk.reasons())
        assert_once_each(await parties.audit(), bulk.tokens(), [i.request_id for i in batch])
    finally:
        await parties.stop_all()
