"""PublicKeyStore: cache hits, single flight, negative cache, refresh window, LRU, cancellation."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping

import pytest

from relay.errors import FlexUnavailable, PublicKeyNotFound
from relay.flex.keys import PublicKeyStore

KID = "zu"


def jwk(kid: str, n: str = "n0") -> dict[str, str]:
    """A stand-in public JWK; the store never looks inside it."""
    return {"kty": "RSA", "kid": kid, "n": n, "e": "AQAB"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """Records every fetch; answers from `keys`, None for a kid it lacks, or raises `error`."""

    def __init__(self, keys: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.keys = dict(keys or {})
        self.calls: list[str] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, kid: str) -> Mapping[str, str] | None:
        self.calls.append(kid)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.keys.get(kid)


class LoopErrors:
    """Collects what the event loop reports, e.g. 'Task exception was never retrieved'."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        asyncio.get_running_loop().set_exception_handler(self._record)

    def _record(self, _loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        self.messages.append(str(context.get("message")))

    def collect(self) -> list[str]:
        gc.collect()
        return self.messages


async def settle() -> None:
    """Let every ready callback and task step run."""
    for _ in range(5):
        await asyncio.sleep(0)


def make_store(fetch: FakeFetch, clock: FakeClock | None = None, **kwargs: float) -> PublicKeyStore:
    return PublicKeyStore(fetch, clock=clock or FakeClock(), **kwargs)  # type: ignore[arg-type]


async def test_a_hit_never_refetches():
    """Once a kid is cached, later gets return it without calling fetch again."""
    fetch = FakeFetch({KID: jwk(KID)})
    store = make_store(fetch)
    first = await store.get(KID)
    second = await store.get(KID)
    third = await store.get(KID)
    assert [KID] == fetch.calls
    assert jwk(KID) == first
    assert first is second is third


async def test_concurrent_gets_share_one_fetch():
    """Twenty concurrent gets for an uncached kid cause exactly one fetch and all get its key."""
    fetch = FakeFetch({KID: jwk(KID)})
    fetch.gate = asyncio.Event()
    store = make_store(fetch)
    waiters = [asyncio.create_task(store.get(KID)) for _ in range(20)]
    await fetch.started.wait()
    await settle()
    fetch.gate.set()
    results = await asyncio.gather(*waiters)
    assert [KID] == fetch.calls
    assert [jwk(KID)] * 20 == results
    assert 1 == len(store)


async def test_a_failed_fetch_reaches_every_waiter_and_is_not_cached():
    """A RelayError from fetch reaches each concurrent waiter, and the next get fetches again."""
    errors = LoopErrors()
    fetch = FakeFetch({KID: jwk(KID)})
    fetch.gate = asyncio.Event()
    fetch.error = FlexUnavailable("Flex public-keys endpoint unreachable", kid=KID)
    store = make_store(fetch)
    waiters = [asyncio.create_task(store.get(KID)) for _ in range(5)]
    await fetch.started.wait()
    fetch.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [fetch.error] * 5 == results
    fetch.error = None
    assert jwk(KID) == await store.get(KID)
    assert [KID, KID] == fetch.calls
    assert [] == errors.collect()


async def test_an_unknown_kid_is_remembered_for_the_negative_ttl():
    """fetch answering None raises PublicKeyNotFound, and is not asked again until the TTL ends."""
    clock = FakeClock()
    fetch = FakeFetch()
    store = make_store(fetch, clock, negative_ttl=30.0)
    with pytest.raises(PublicKeyNotFound) as first:
        await store.get("xx")
    clock.now += 29.9
    with pytest.raises(PublicKeyNotFound) as second:
        await store.get("xx")
    assert ["xx"] == fetch.calls
    assert {"kid": "xx"} == first.value.ids == second.value.ids
    clock.now += 0.2
    with pytest.raises(PublicKeyNotFound):
        await store.get("xx")
    assert ["xx", "xx"] == fetch.calls


async def test_a_kid_that_becomes_known_is_served_after_the_negative_ttl():
    """After the negative TTL a kid Flex now knows is fetched, cached and no longer refused."""
    clock = FakeClock()
    fetch = FakeFetch()
    store = make_store(fetch, clock, negative_ttl=30.0)
    with pytest.raises(PublicKeyNotFound):
        await store.get(KID)
    fetch.keys[KID] = jwk(KID)
    clock.now += 31.0
    assert jwk(KID) == await store.get(KID)
    assert jwk(KID) == await store.get(KID)
    assert [KID, KID] == fetch.calls


async def test_refresh_within_the_interval_does_not_fetch():
    """refresh() soon after a fetch returns None, keeps the cached key and does not call fetch."""
    clock = FakeClock()
    fetch = FakeFetch({KID: jwk(KID, "old")})
    store = make_store(fetch, clock, refresh_interval=60.0)
    await store.get(KID)
    clock.now += 59.0
    fetch.keys[KID] = jwk(KID, "new")
    assert None is await store.refresh(KID)
    assert [KID] == fetch.calls
    assert jwk(KID, "old") == await store.get(KID)


async def test_refresh_after_the_interval_replaces_the_key():
    """refresh() past the interval refetches, returns the new key, and later gets serve it."""
    clock = FakeClock()
    fetch = FakeFetch({KID: jwk(KID, "old")})
    store = make_store(fetch, clock, refresh_interval=60.0)
    await store.get(KID)
    clock.now += 60.0
    fetch.keys[KID] = jwk(KID, "new")
    assert jwk(KID, "new") == await store.refresh(KID)
    assert jwk(KID, "new") == await store.get(KID)
    assert [KID, KID] == fetch.calls
    assert None is await store.refresh(KID)
    assert [KID, KID] == fetch.calls


async def test_concurrent_refreshes_share_one_fetch():
    """Two refreshes and a get racing past the interval cause one fetch, and all see the new key."""
    clock = FakeClock()
    fetch = FakeFetch({KID: jwk(KID, "old")})
    store = make_store(fetch, clock, refresh_interval=60.0)
    await store.get(KID)
    clock.now += 61.0
    fetch.keys[KID] = jwk(KID, "new")
    fetch.gate = asyncio.Event()
    fetch.started.clear()
    racing = [store.refresh(KID), store.refresh(KID), store.get(KID)]
    waiters = [asyncio.create_task(call) for call in racing]
    await fetch.started.wait()
    await settle()
    fetch.gate.set()
    assert [jwk(KID, "new")] * 3 == await asyncio.gather(*waiters)
    assert [KID, KID] == fetch.calls


async def test_the_least_recently_used_key_is_evicted_at_max_keys():
    """With max_keys=2, a third kid evicts the one used least recently, which is then refetched."""
    fetch = FakeFetch({kid: jwk(kid) for kid in ("a", "b", "c")})
    store = make_store(fetch, max_keys=2)
    await store.get("a")
    await store.get("b")
    await store.get("a")  # a is now the most recently used
    await store.get("c")
    assert 2 == len(store)
    await store.get("a")
    await store.get("c")
    assert ["a", "b", "c"] == fetch.calls
    await store.get("b")
    assert ["a", "b", "c", "b"] == fetch.calls
    assert 2 == len(store)


async def test_cancelling_one_waiter_does_not_cancel_the_shared_fetch():
    """Of two waiters on one fetch, the cancelled one stops and the other still gets the key."""
    errors = LoopErrors()
    fetch = FakeFetch({KID: jwk(KID)})
    fetch.gate = asyncio.Event()
    store = make_store(fetch)
    impatient = asyncio.create_task(store.get(KID))
    patient = asyncio.create_task(store.get(KID))
    await fetch.started.wait()
    impatient.cancel()
    await settle()
    fetch.gate.set()
    assert jwk(KID) == await patient
    assert impatient.cancelled()
    assert [KID] == fetch.calls
    assert jwk(KID) == await store.get(KID)
    assert [KID] == fetch.calls
    assert [] == errors.collect()


async def test_a_fetch_that_fails_after_its_only_waiter_left_is_not_reported():
    """A failure nobody awaits any more is retrieved by the store, so the loop reports nothing."""
    errors = LoopErrors()
    fetch = FakeFetch()
    fetch.gate = asyncio.Event()
    fetch.error = FlexUnavailable("Flex public-keys endpoint unreachable", kid=KID)
    store = make_store(fetch)
    waiter = asyncio.create_task(store.get(KID))
    await fetch.started.wait()
    waiter.cancel()
    await settle()
    fetch.gate.set()
    await settle()
    del waiter
    assert [] == errors.collect()
    assert [KID] == fetch.calls


async def test_an_unknown_kid_with_no_waiter_left_is_not_reported():
    """A PublicKeyNotFound nobody awaits is not logged as an unretrieved task exception."""
    errors = LoopErrors()
    fetch = FakeFetch()
    fetch.gate = asyncio.Event()
    store = make_store(fetch)
    waiters = [asyncio.create_task(store.get("xx")) for _ in range(2)]
    await fetch.started.wait()
    for waiter in waiters:
        waiter.cancel()
    await settle()
    fetch.gate.set()
    await settle()
    del waiters
    assert [] == errors.collect()
    with pytest.raises(PublicKeyNotFound):
        await store.get("xx")
    assert ["xx"] == fetch.calls


async def test_the_loop_error_check_sees_an_unretrieved_task_exception():
    """The LoopErrors check used above does catch a task whose exception nobody retrieved."""
    errors = LoopErrors()

    async def fail() -> None:
        raise FlexUnavailable("Flex public-keys endpoint unreachable")

    task = asyncio.create_task(fail())
    await settle()
    assert task.done()
    del task
    assert ["Task exception was never retrieved"] == errors.collect()
