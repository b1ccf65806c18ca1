"""The token ledger on every backend: idempotency, concurrent duplicates, leases and expiry.

Every test that takes ``ledger`` or ``open_ledgers`` runs on memory, on SQLite (a fresh file
under tmp_path) and on PostgreSQL (a fresh schema in the run's own database,
tests/vault_backends.py); tests named ``*_replicas`` open two PostgreSQL ledgers on one
database, as two gateway replicas would. ``successor`` gives the ledger that takes over from a
holder that is gone: the same one in memory (one process), the SQLite file closed and opened
again (a restart), another replica on PostgreSQL. Time moves with the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from merchant_side.ledger import (
    MAX_REQUEST_ID_LENGTH,
    Claim,
    Ledger,
    MemoryLedger,
    TokenRecord,
    open_ledger,
)
from merchant_side.ledger.memory import PURGE_EVERY
from merchant_side.ledger.model import NOTED_ATTEMPT_KEEP_SECONDS
from merchant_side.ledger.postgres import MIGRATIONS
from merchant_side.ledger.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from relay.errors import ConfigError, InvalidRequest, Unavailable
from relay.secrets import Secret
from tests.vault_backends import (  # noqa: F401 - pytest finds fixtures by name
    postgres_database,
    postgres_schema,
    postgres_server,
)

LEASE = 10.0
WAIT = 5.0
APP = "app-1"
"""The app whose requests most tests make; OTHER_APP's are separate requests."""
OTHER_APP = "app-2"
TOKEN = "eyJraWQiOiJ0ZXN0In0.eyJqdGkiOiJ0dC0xIn0.c2lnbmF0dXJl"  # a fake TT: a JWT in shape only
CC_1 = "eyJraWQiOiJjYyJ9.eyJqdGkiOiJjYy0xIn0.c2lnbmF0dXJlLTE"  # fake capture contexts
CC_2 = "eyJraWQiOiJjYyJ9.eyJqdGkiOiJjYy0yIn0.c2lnbmF0dXJlLTI"

OpenLedgers = Callable[[], Awaitable[Ledger]]
Successor = Callable[[Ledger], Awaitable[Ledger]]


class FakeClock:
    """Real time plus an offset that a test moves forward to expire tokens."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def postgres_ledger_url(request: pytest.FixtureRequest) -> Iterator[str]:
    database: str = request.getfixturevalue("postgres_database")
    with postgres_schema(database) as url:
        yield url


@pytest.fixture
def sqlite_ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory"
    fixture = {"sqlite": "sqlite_ledger_url", "postgresql": "postgres_ledger_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


async def _opener(url: str, clock: FakeClock) -> AsyncIterator[OpenLedgers]:
    opened: list[Ledger] = []

    async def open_one() -> Ledger:
        opened.append(await open_ledger(Secret(url), clock=clock))
        return opened[-1]

    yield open_one
    for ledger in opened:
        await ledger.close()


@pytest.fixture
async def open_ledgers(ledger_url: str, clock: FakeClock) -> AsyncIterator[OpenLedgers]:
    async for opener in _opener(ledger_url, clock):
        yield opener


@pytest.fixture
async def open_replicas(postgres_ledger_url: str, clock: FakeClock) -> AsyncIterator[OpenLedgers]:
    async for opener in _opener(postgres_ledger_url, clock):
        yield opener


@pytest.fixture
async def open_sqlite(sqlite_ledger_url: str, clock: FakeClock) -> AsyncIterator[OpenLedgers]:
    async for opener in _opener(sqlite_ledger_url, clock):
        yield opener


@pytest.fixture
async def ledger(open_ledgers: OpenLedgers) -> Ledger:
    return await open_ledgers()


@pytest.fixture
def successor(ledger_url: str, open_ledgers: OpenLedgers) -> Successor:
    async def take_over_from(gone: Ledger) -> Ledger:
        if ledger_url == "memory":
            return gone
        if ledger_url.startswith("sqlite"):
            await gone.close()
        return await open_ledgers()

    return take_over_from


def make_record(  # noqa: PLR0913  a record's knobs, all defaulted
    clock: FakeClock,
    request_id: str = "req-1",
    card_ref: str = "card-1",
    *,
    ttl: int = 900,
    jti: str = "tt-1",
    app: str = APP,
) -> TokenRecord:
    return TokenRecord(
        app_id=app,
        request_id=request_id,
        card_ref=card_ref,
        transient_token=TOKEN,
        jti=jti,
        expires_at=int(clock()) + ttl,
        masked_pan="XXXXXXXXXXXX1111",
        bin="411111",
        card_type="001",
    )


async def claim(  # noqa: PLR0913  a claim's knobs, all defaulted
    ledger: Ledger,
    request_id: str = "req-1",
    card_ref: str = "card-1",
    *,
    lease: float = LEASE,
    wait: float = WAIT,
    app: str = APP,
) -> Claim:
    return await ledger.claim(app, request_id, card_ref, lease_seconds=lease, wait_seconds=wait)


async def tokenize_once(ledger: Ledger, record: TokenRecord, work: float = 0.1) -> Claim | str:
    """What the gateway does: claim, and if it owns the request, work then complete."""
    claimed = await claim(ledger, record.request_id, record.card_ref)
    if claimed.record is not None:
        return claimed
    await asyncio.sleep(work)
    await ledger.complete(record)
    return "tokenized"


# --- The basic life of a request_id ------------------------------------------------------------


async def test_claim_complete_replay_and_expiry(ledger: Ledger, clock: FakeClock) -> None:
    """A new id is owned, a completed one replays its record, an expired one is free again."""
    assert Claim(None) == await claim(ledger)
    record = make_record(clock)
    await ledger.complete(record)
    assert Claim(record) == await claim(ledger)
    assert record == await ledger.get(APP, "req-1")
    clock.advance(900)
    assert await ledger.get(APP, "req-1") is None
    assert Claim(None) == await claim(ledger)


async def test_get_of_an_unknown_or_pending_id_is_none(ledger: Ledger) -> None:
    """Only a completed, live record is returned."""
    assert await ledger.get(APP, "nobody") is None
    await claim(ledger)
    assert await ledger.get(APP, "req-1") is None


@pytest.mark.parametrize("completed", [False, True], ids=["pending", "done"])
async def test_another_card_ref_is_refused(
    ledger: Ledger, clock: FakeClock, completed: bool
) -> None:
    """A request_id held or recorded for one card_ref cannot be used for another."""
    await claim(ledger)
    if completed:
        await ledger.complete(make_record(clock))
    with pytest.raises(InvalidRequest) as info:
        await claim(ledger, card_ref="card-2", wait=0)
    assert "request_id was already used for another card_ref" == info.value.message
    assert {"request_id": "req-1"} == info.value.ids


async def test_an_expired_record_frees_the_id_for_another_card(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Once its token expired, a request_id may be used again, for any card_ref."""
    await claim(ledger)
    await ledger.complete(make_record(clock))
    clock.advance(901)
    assert Claim(None) == await claim(ledger, card_ref="card-2")


async def test_complete_keeps_the_first_live_record(ledger: Ledger, clock: FakeClock) -> None:
    """A second complete (a holder whose lease lapsed) does not change what duplicates got."""
    await claim(ledger)
    first = make_record(clock)
    await ledger.complete(first)
    await ledger.complete(make_record(clock, jti="tt-2"))
    assert first == await ledger.get(APP, "req-1")


async def test_request_id_length_is_checked(ledger: Ledger) -> None:
    """Empty and oversized ids are refused before they reach storage."""
    for request_id in ("", "r" * (MAX_REQUEST_ID_LENGTH + 1)):
        with pytest.raises(InvalidRequest):
            await claim(ledger, request_id)
    assert Claim(None) == await claim(ledger, "r" * MAX_REQUEST_ID_LENGTH)


# --- Concurrent duplicates ---------------------------------------------------------------------


async def test_concurrent_duplicates_tokenize_once(ledger: Ledger, clock: FakeClock) -> None:
    """20 concurrent claims of one id: one works and completes, 19 get its record."""
    record = make_record(clock)
    results = await asyncio.gather(*(tokenize_once(ledger, record) for _ in range(20)))
    assert 1 == results.count("tokenized")
    assert [Claim(record)] * 19 == [result for result in results if result != "tokenized"]


async def test_concurrent_duplicates_across_replicas_tokenize_once(
    open_replicas: OpenLedgers, clock: FakeClock
) -> None:
    """Two replicas (two pools) racing on one id: exactly one winner overall."""
    replicas = [await open_replicas(), await open_replicas()]
    record = make_record(clock)
    results = await asyncio.gather(
        *(tokenize_once(replicas[index % 2], record) for index in range(20))
    )
    assert 1 == results.count("tokenized")
    assert [Claim(record)] * 19 == [result for result in results if result != "tokenized"]


async def test_concurrent_takeover_of_an_expired_record_has_one_winner(
    ledger: Ledger, clock: FakeClock
) -> None:
    """An expired record is free again, but only for one of many concurrent claimants."""
    await claim(ledger)
    await ledger.complete(make_record(clock, ttl=1))
    clock.advance(2)
    fresh = make_record(clock, jti="tt-2")
    results = await asyncio.gather(*(tokenize_once(ledger, fresh) for _ in range(20)))
    assert 1 == results.count("tokenized")
    assert fresh == await ledger.get(APP, "req-1")


async def test_concurrent_takeover_across_replicas_has_one_winner(
    open_replicas: OpenLedgers, clock: FakeClock
) -> None:
    """A lapsed lease seen by two replicas at once is taken over by exactly one claimant."""
    replicas = [await open_replicas(), await open_replicas()]
    await claim(replicas[0], lease=0.2)
    await asyncio.sleep(0.25)
    results = await asyncio.gather(
        *(tokenize_once(replicas[index % 2], make_record(clock)) for index in range(20))
    )
    assert 1 == results.count("tokenized")


# --- Waiting: abandon, lapsed leases, the wait limit -------------------------------------------


async def _claim_timed(ledger: Ledger) -> tuple[Claim, float]:
    started = time.monotonic()
    claimed = await claim(ledger)
    return claimed, time.monotonic() - started


async def test_abandon_lets_a_waiter_take_over_promptly(ledger: Ledger) -> None:
    """A waiter is woken by abandon and owns the request at once, long before the lease ends."""
    await claim(ledger)
    waiter = asyncio.create_task(claim(ledger))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    abandoned_at = time.monotonic()
    await ledger.abandon(APP, "req-1")
    assert Claim(None) == await waiter
    assert time.monotonic() - abandoned_at < 0.3


async def test_abandon_wakes_a_waiter_on_another_replica(open_replicas: OpenLedgers) -> None:
    """The NOTIFY of one replica's abandon wakes a waiter on another, faster than its timer."""
    holder, other = await open_replicas(), await open_replicas()
    await claim(holder)
    waiter = asyncio.create_task(claim(other))
    await asyncio.sleep(0.1)
    abandoned_at = time.monotonic()
    await holder.abandon(APP, "req-1")
    assert Claim(None) == await waiter
    assert time.monotonic() - abandoned_at < 0.3


async def test_abandon_ends_only_this_replicas_lease(open_replicas: OpenLedgers) -> None:
    """A replica cannot end a lease another replica holds (it may have taken it over)."""
    holder, other = await open_replicas(), await open_replicas()
    await claim(holder)
    await other.abandon(APP, "req-1")
    with pytest.raises(Unavailable):
        await claim(other, wait=0.1)


async def test_a_lapsed_lease_is_taken_over(ledger: Ledger) -> None:
    """A holder that vanished without abandon loses the request after lease_seconds."""
    await claim(ledger, lease=0.3)
    claimed, waited = await _claim_timed(ledger)
    assert Claim(None) == claimed
    assert 0.2 < waited < 1.0


async def test_a_lapsed_lease_is_taken_over_by_another_replica(open_replicas: OpenLedgers) -> None:
    """A replica that died holding a lease does not block the others for longer than it."""
    gone, other = await open_replicas(), await open_replicas()
    await claim(gone, lease=0.3)
    await gone.close()
    claimed, waited = await _claim_timed(other)
    assert Claim(None) == claimed
    assert 0.2 < waited < 1.0


async def test_waiting_past_wait_seconds_is_unavailable(ledger: Ledger) -> None:
    """While another caller holds the id, a claim gives up after wait_seconds, retryably."""
    await claim(ledger)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await claim(ledger, wait=0.2)
    assert 0.15 < time.monotonic() - started < 0.8
    assert "request_id is being processed" == info.value.message
    assert {"request_id": "req-1"} == info.value.ids
    assert info.value.retryable


# --- Renewed leases and noted attempts ---------------------------------------------------------


async def test_a_takeover_is_told_the_attempt_the_lapsed_holder_noted(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """The last capture context noted on a lapsed lease comes back with the claim that takes it."""
    await claim(ledger)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    assert await ledger.note_attempt(APP, "req-1", CC_2)
    clock.advance(LEASE + 1)
    assert Claim(None, CC_2) == await claim(await successor(ledger))


async def test_a_noted_attempt_outlives_takeovers_that_note_nothing(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """No attempt until one is noted; then every later takeover is told it, noted or not again.

    A holder that takes over and fails before it sends anything must not make the next one
    forget the attempt whose outcome nobody knows.
    """
    await claim(ledger)
    clock.advance(LEASE + 1)
    other = await successor(ledger)
    assert Claim(None) == await claim(other)
    assert await other.note_attempt(APP, "req-1", CC_1)
    clock.advance(LEASE + 1)
    third = await successor(other)
    assert Claim(None, CC_1) == await claim(third)
    clock.advance(LEASE + 1)
    assert Claim(None, CC_1) == await claim(await successor(third))


async def test_a_takeover_for_another_card_inherits_no_attempt(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """A lapsed claim taken over for another card_ref is another request: no attempt to ask."""
    await claim(ledger)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    clock.advance(LEASE + 1)
    assert Claim(None) == await claim(await successor(ledger), card_ref="card-2")


async def test_an_expired_record_takes_no_attempt_along(ledger: Ledger, clock: FakeClock) -> None:
    """complete forgets the attempt: the takeover of an expired record has no previous attempt."""
    await claim(ledger)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    await ledger.complete(make_record(clock, ttl=60))
    clock.advance(61)
    assert Claim(None) == await claim(ledger)


async def test_renew_keeps_a_lease_from_lapsing(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """A renewed lease outlives its first lease_seconds, and lapses lease_seconds after renew."""
    await claim(ledger)
    clock.advance(LEASE - 2)
    assert await ledger.renew(APP, "req-1", LEASE)
    clock.advance(LEASE - 2)
    other = await successor(ledger)
    with pytest.raises(Unavailable):
        await claim(other, wait=0)
    clock.advance(3)
    assert Claim(None) == await claim(other)


async def test_a_lapsed_lease_nobody_took_over_is_still_held(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Until a claim takes it over, the holder of a lapsed lease may renew it and note on it."""
    await claim(ledger)
    clock.advance(LEASE + 1)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    assert await ledger.renew(APP, "req-1", LEASE)
    with pytest.raises(Unavailable):
        await claim(ledger, wait=0)


async def test_renew_and_note_attempt_need_a_pending_lease(
    ledger: Ledger, clock: FakeClock
) -> None:
    """An unknown, completed or abandoned request_id has no lease to renew or note on."""
    assert (False, False) == await _renew_and_note(ledger, "req-1")
    await claim(ledger)
    await ledger.complete(make_record(clock))
    assert (False, False) == await _renew_and_note(ledger, "req-1")
    await claim(ledger, "req-2")
    await ledger.abandon(APP, "req-2")
    assert (False, False) == await _renew_and_note(ledger, "req-2")
    await claim(ledger, "req-3")
    assert (True, True) == await _renew_and_note(ledger, "req-3")


async def _renew_and_note(ledger: Ledger, request_id: str, *, app: str = APP) -> tuple[bool, bool]:
    renewed = await ledger.renew(app, request_id, LEASE)
    return renewed, await ledger.note_attempt(app, request_id, CC_1)


async def test_a_replica_that_lost_its_lease_can_neither_renew_nor_note(
    open_replicas: OpenLedgers, clock: FakeClock
) -> None:
    """Once another replica took the lapsed lease over, the old holder's calls change nothing."""
    holder, other = await open_replicas(), await open_replicas()
    await claim(holder)
    assert await holder.note_attempt(APP, "req-1", CC_1)
    clock.advance(LEASE + 1)
    assert Claim(None, CC_1) == await claim(other)
    assert (False, False) == await _renew_and_note(holder, "req-1")
    await holder.abandon(APP, "req-1")
    assert (True, True) == await _renew_and_note(other, "req-1")
    clock.advance(LEASE - 1)
    with pytest.raises(Unavailable):
        await claim(holder, wait=0)


async def test_a_holder_that_lost_its_lease_still_records_its_token(
    open_replicas: OpenLedgers, clock: FakeClock
) -> None:
    """A token issued under a lapsed lease is stored if nobody stored one; the next is ignored."""
    holder, other = await open_replicas(), await open_replicas()
    await claim(holder)
    clock.advance(LEASE + 1)
    assert Claim(None) == await claim(other)
    late = make_record(clock)
    await holder.complete(late)
    await other.complete(make_record(clock, jti="tt-2"))
    assert late == await other.get(APP, "req-1")
    assert (False, False) == await _renew_and_note(other, "req-1")


async def test_a_note_committed_while_a_takeover_waits_is_what_it_reports(
    open_replicas: OpenLedgers, postgres_ledger_url: str, clock: FakeClock
) -> None:
    """The takeover reads the attempt from the row it locked, not from its older snapshot."""
    holder, other = await open_replicas(), await open_replicas()
    await claim(holder)
    assert await holder.note_attempt(APP, "req-1", CC_1)
    clock.advance(LEASE + 1)
    async with await psycopg.AsyncConnection.connect(postgres_ledger_url) as conn:
        # A note_attempt in flight: it holds the row until it commits.
        await conn.execute(
            "UPDATE token_ledger SET attempt_cc = %s WHERE request_id = 'req-1'", (CC_2,)
        )
        takeover = asyncio.create_task(claim(other))
        await _until_a_statement_waits_for_a_lock(postgres_ledger_url)
        await conn.commit()
    assert Claim(None, CC_2) == await takeover


async def _until_a_statement_waits_for_a_lock(url: str) -> None:
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        async with asyncio.timeout(10):
            while (await (await conn.execute(query)).fetchone()) != (1,):
                await asyncio.sleep(0.01)


# --- Apps: (app_id, request_id) is the key -----------------------------------------------------


async def test_the_same_request_id_in_two_apps_is_two_requests(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Each app claims, completes and replays its own request, with its own token."""
    assert Claim(None) == await claim(ledger)
    assert Claim(None) == await claim(ledger, app=OTHER_APP, wait=0)
    mine = make_record(clock)
    theirs = make_record(clock, jti="tt-2", app=OTHER_APP)
    await ledger.complete(mine)
    await ledger.complete(theirs)
    assert Claim(mine) == await claim(ledger)
    assert Claim(theirs) == await claim(ledger, app=OTHER_APP)
    assert mine == await ledger.get(APP, "req-1")
    assert theirs == await ledger.get(OTHER_APP, "req-1")


async def test_an_app_never_sees_another_apps_entries(ledger: Ledger, clock: FakeClock) -> None:
    """Another app's request_id is unknown to an app, for every operation."""
    await claim(ledger)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    assert (False, False) == await _renew_and_note(ledger, "req-1", app=OTHER_APP)
    await ledger.abandon(OTHER_APP, "req-1")
    await ledger.complete(make_record(clock))
    assert await ledger.get(OTHER_APP, "req-1") is None
    # Another card_ref is no conflict either: it is another app's request.
    assert Claim(None) == await claim(ledger, card_ref="card-2", app=OTHER_APP, wait=0)
    assert make_record(clock) == await ledger.get(APP, "req-1")


async def test_a_takeover_inherits_only_its_own_apps_attempt(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """A noted attempt stays with its app's request: another app's takeover is a new request."""
    await claim(ledger, lease=1)
    assert await ledger.note_attempt(APP, "req-1", CC_1)
    clock.advance(2)
    after = await successor(ledger)
    assert Claim(None) == await claim(after, app=OTHER_APP)
    assert Claim(None, CC_1) == await claim(after)


async def test_the_receipt_is_stored_with_the_record(ledger: Ledger, clock: FakeClock) -> None:
    """The PCI side's receipt comes back with the record, from claim and from get."""
    await claim(ledger)
    record = dataclasses.replace(make_record(clock), receipt="eyJhbGciOiJFZERTQSJ9.e30.c2ln")
    await ledger.complete(record)
    assert Claim(record) == await claim(ledger)
    got = await ledger.get(APP, "req-1")
    assert got is not None
    assert record.receipt == got.receipt


# --- SQLite: one process's durable file --------------------------------------------------------


async def test_a_restart_keeps_every_recorded_token(
    open_sqlite: OpenLedgers, clock: FakeClock
) -> None:
    """A token completed before the ledger closed is replayed by the ledger opened after."""
    before = await open_sqlite()
    await claim(before)
    record = make_record(clock)
    await before.complete(record)
    await before.close()
    after = await open_sqlite()
    assert Claim(record) == await claim(after)
    assert record == await after.get(APP, "req-1")


async def test_a_reopened_sqlite_ledger_does_not_hold_the_old_leases(
    open_sqlite: OpenLedgers, clock: FakeClock
) -> None:
    """A restarted process must take a lapsed lease over before it may renew or note on it."""
    before = await open_sqlite()
    await claim(before)
    await before.close()
    after = await open_sqlite()
    assert (False, False) == await _renew_and_note(after, "req-1")
    await after.abandon(APP, "req-1")
    with pytest.raises(Unavailable):
        await claim(after, wait=0)
    clock.advance(LEASE + 1)
    assert Claim(None) == await claim(after)
    assert (True, True) == await _renew_and_note(after, "req-1")


async def test_a_second_sqlite_ledger_on_an_open_file_is_refused(
    open_sqlite: OpenLedgers,
) -> None:
    """One process owns the file: another opener is told to use PostgreSQL, until it closes."""
    first = await open_sqlite()
    with pytest.raises(ConfigError) as info:
        await open_sqlite()
    assert "is in use by another process: use PostgreSQL for several replicas" in str(info.value)
    await first.close()
    await open_sqlite()


async def test_the_sqlite_files_are_owner_only(
    open_sqlite: OpenLedgers, sqlite_ledger_url: str, clock: FakeClock
) -> None:
    """The ledger, its WAL and its lock file are created mode 0600: they hold bearer tokens."""
    ledger = await open_sqlite()
    await claim(ledger)
    await ledger.complete(make_record(clock))
    path = sqlite_ledger_url.removeprefix("sqlite:///")
    files = [Path(path), Path(f"{path}-wal"), Path(f"{path}.lock")]
    modes = {file: stat.S_IMODE(file.stat().st_mode) for file in files}
    assert dict.fromkeys(files, 0o600) == modes


async def test_a_sqlite_ledger_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    """A path that cannot be created fails at open, naming the setting, not the path."""
    with pytest.raises(ConfigError) as info:
        await open_ledger(Secret(f"sqlite:///{tmp_path}/missing/ledger.db"))
    assert "RELAY_MERCHANT_LEDGER_URL" in str(info.value)
    assert str(tmp_path) not in str(info.value)


async def test_a_closed_sqlite_ledger_is_unavailable(open_sqlite: OpenLedgers) -> None:
    """Calls after close, and waiters woken by it, get a retryable error."""
    ledger = await open_sqlite()
    await claim(ledger)
    waiter = asyncio.create_task(claim(ledger))
    await asyncio.sleep(0)
    await ledger.close()
    with pytest.raises(Unavailable):
        await waiter
    with pytest.raises(Unavailable):
        await ledger.get(APP, "req-1")


async def test_a_version_1_sqlite_file_is_upgraded_with_its_rows_unreachable(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Rows written before apps were named go to app '': no app reaches them, none is lost."""
    path = tmp_path / "ledger.db"
    record = make_record(clock)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE token_ledger_schema (version INTEGER PRIMARY KEY, "
            "applied_at TEXT NOT NULL) STRICT"
        )
        for statement in SQLITE_MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO token_ledger_schema VALUES (1, '2026-01-01T00:00:00+00:00')")
        conn.execute(
            "INSERT INTO token_ledger (request_id, card_ref, state, transient_token, jti, "
            "expires_at, masked_pan, bin, card_type) VALUES (?, ?, 'done', ?, ?, ?, ?, ?, ?)",
            (record.request_id, record.card_ref, TOKEN, record.jti, record.expires_at,
             record.masked_pan, record.bin, record.card_type),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO token_ledger (request_id, card_ref, state, lease_owner, lease_until, "
            "attempt_cc) VALUES ('req-2', 'card-1', 'pending', 'gone', ?, ?)",
            (clock() - 1, CC_1),
        )
    ledger = await open_ledger(Secret(f"sqlite:///{path}"), clock=clock)
    try:
        assert await ledger.get(APP, "req-1") is None
        assert Claim(None) == await claim(ledger)
        assert Claim(None) == await claim(ledger, "req-2")
    finally:
        await ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        versions = conn.execute("SELECT version FROM token_ledger_schema ORDER BY version")
        assert [(version,) for version, _ in SQLITE_MIGRATIONS] == versions.fetchall()
        rows = conn.execute("SELECT app_id, request_id, jti, attempt_cc FROM token_ledger")
        assert {("", "req-1", record.jti, None), ("", "req-2", None, CC_1)} <= set(rows)


# --- Purging and secrecy -----------------------------------------------------------------------


async def test_purge_expired_removes_expired_records_and_lapsed_leases(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Expired records and lapsed leases go; live records and live leases stay."""
    for request_id, ttl in (("old", 60), ("new", 900)):
        await claim(ledger, request_id)
        await ledger.complete(make_record(clock, request_id, ttl=ttl))
    await claim(ledger, "lapsed", lease=30)
    await claim(ledger, "held", lease=300)
    clock.advance(120)
    assert 2 == await ledger.purge_expired()
    assert 0 == await ledger.purge_expired()
    assert await ledger.get(APP, "new") is not None
    with pytest.raises(Unavailable):
        await claim(ledger, "held", wait=0)


async def test_purge_keeps_a_lapsed_claim_with_a_noted_attempt_for_a_while(
    ledger: Ledger, successor: Successor, clock: FakeClock
) -> None:
    """A claim whose attempt's outcome is unknown survives purges until its token would be dead."""
    await claim(ledger, "noted", lease=30)
    assert await ledger.note_attempt(APP, "noted", CC_1)
    clock.advance(60)
    assert 0 == await ledger.purge_expired()
    clock.advance(NOTED_ATTEMPT_KEEP_SECONDS - 60)
    assert 0 == await ledger.purge_expired()
    after = await successor(ledger)
    assert Claim(None, CC_1) == await claim(after, "noted", lease=30)
    clock.advance(30 + NOTED_ATTEMPT_KEEP_SECONDS)
    assert 1 == await after.purge_expired()


async def test_the_memory_ledger_purges_lazily(clock: FakeClock) -> None:
    """Expired entries do not pile up in memory even if nobody calls purge_expired."""
    ledger = MemoryLedger(clock=clock)
    for index in range(PURGE_EVERY - 1):
        await claim(ledger, f"old-{index}", lease=1)
    clock.advance(2)
    assert PURGE_EVERY - 1 == len(ledger)
    await claim(ledger, "new")
    assert 1 == len(ledger)


def test_repr_hides_the_transient_token(clock: FakeClock) -> None:
    """The TT is a bearer credential: no rendering of a record shows it."""
    record = make_record(clock)
    for text in (repr(record), str(record), f"{record}", repr(Claim(record))):
        assert TOKEN not in text
        assert "tt-1" in text


def test_repr_leaves_out_the_previous_attempt() -> None:
    """A claim's repr shows no capture context: only ids belong in logs."""
    assert "Claim(record=None)" == repr(Claim(None, CC_1))


async def test_the_transient_token_is_never_logged(
    ledger: Ledger, clock: FakeClock, log_stream: io.StringIO
) -> None:
    """Paths that log (a lapsed lease, an ignored complete) name the request, not the token."""
    await claim(ledger, lease=0.05)
    await asyncio.sleep(0.1)
    await claim(ledger)
    await ledger.complete(make_record(clock))
    await ledger.complete(make_record(clock))
    logged = log_stream.getvalue()
    assert "ledger_lease_lapsed" in logged
    assert "ledger_complete_ignored" in logged
    assert TOKEN not in logged


# --- Opening -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1/0", "sqlite://ledger.db", "sqlite:///", "sqlite:///:memory:"]
)
async def test_open_ledger_refuses_other_urls(url: str) -> None:
    """Only sqlite:///PATH (a file), postgresql:// and memory name a ledger."""
    with pytest.raises(ConfigError):
        await open_ledger(Secret(url))


async def test_concurrent_opens_migrate_once(postgres_ledger_url: str) -> None:
    """Replicas starting together create the table once; opening again changes nothing."""
    ledgers = await asyncio.gather(*(open_ledger(Secret(postgres_ledger_url)) for _ in range(4)))
    ledgers.append(await open_ledger(Secret(postgres_ledger_url)))
    for ledger in ledgers:
        await ledger.close()
    async with await psycopg.AsyncConnection.connect(postgres_ledger_url) as conn:
        cursor = await conn.execute("SELECT version FROM token_ledger_schema ORDER BY version")
        assert [(version,) for version, _ in MIGRATIONS] == await cursor.fetchall()


async def test_a_version_1_table_is_upgraded_with_its_rows(
    postgres_ledger_url: str, clock: FakeClock
) -> None:
    """A ledger written before attempts were noted or apps named keeps its rows, unreachable.

    Its rows belong to app '', which no app can be: the same request_id is a new request for
    every app, and the old row stays in the table until it expires.
    """
    record = make_record(clock)
    async with await psycopg.AsyncConnection.connect(postgres_ledger_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE token_ledger_schema (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        for statement in MIGRATIONS[0][1]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO token_ledger_schema (version) VALUES (1)")
        await conn.execute(
            "INSERT INTO token_ledger (request_id, card_ref, state, transient_token, jti, "
            "expires_at, masked_pan, bin, card_type) "
            "VALUES (%s, %s, 'done', %s, %s, %s, %s, %s, %s)",
            (record.request_id, record.card_ref, TOKEN, record.jti, record.expires_at,
             record.masked_pan, record.bin, record.card_type),
        )  # fmt: skip
    ledger = await open_ledger(Secret(postgres_ledger_url), clock=clock)
    try:
        assert await ledger.get(APP, "req-1") is None
        assert Claim(None) == await claim(ledger)
        assert await ledger.note_attempt(APP, "req-1", CC_1)
    finally:
        await ledger.close()
    async with await psycopg.AsyncConnection.connect(postgres_ledger_url) as conn:
        cursor = await conn.execute("SELECT app_id, jti FROM token_ledger ORDER BY app_id")
        assert [("", record.jti), (APP, None)] == await cursor.fetchall()


async def test_a_lost_listen_connection_is_restored(
    open_replicas: OpenLedgers, postgres_ledger_url: str
) -> None:
    """If the server drops the LISTEN connection, waiters still wake, and listening resumes."""
    holder, other = await open_replicas(), await open_replicas()
    async with await psycopg.AsyncConnection.connect(postgres_ledger_url) as conn:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        )
    await claim(holder)
    waiter = asyncio.create_task(claim(other))
    await asyncio.sleep(0.1)
    await holder.abandon(APP, "req-1")
    assert Claim(None) == await asyncio.wait_for(waiter, 1.0)
    await other.abandon(APP, "req-1")
    await claim(holder)
    waiter = asyncio.create_task(claim(other))
    await asyncio.sleep(0.1)
    abandoned_at = time.monotonic()
    await holder.abandon(APP, "req-1")
    assert Claim(None) == await waiter
    assert time.monotonic() - abandoned_at < 0.3
