"""The PCI side's map of releases by capture context: one attempt's result, never two attempts."""

from __future__ import annotations

import asyncio

import pytest

from pci_side.releases import ReleaseKey, Releases
from relay.errors import FlexUnavailable

KEY = ReleaseKey("m1", "order-1", "card-1")


class Clock:
    """Epoch seconds the test moves."""

    def __init__(self) -> None:
        """Start at 1000."""
        self.now = 1000.0

    def __call__(self) -> float:
        """The time now."""
        return self.now


async def test_a_running_attempt_is_shared_with_a_repeat_of_the_same_request() -> None:
    """A repeat waits on the running attempt and gets its result."""
    releases: Releases[str] = Releases()
    release = releases.start("cc-1", KEY)
    repeat = releases.find("cc-1", KEY)
    assert repeat is not None
    release.finish("tt-1", keep_until=2000.0)
    assert "tt-1" == await repeat


async def test_another_request_under_the_same_context_shares_nothing() -> None:
    """A different merchant, request_id, card_ref or app finds no attempt to share."""
    releases: Releases[str] = Releases()
    releases.start("cc-1", KEY)
    others = [
        ReleaseKey("m2", "order-1", "card-1"),
        ReleaseKey("m1", "order-2", "card-1"),
        ReleaseKey("m1", "order-1", "card-2"),
        ReleaseKey("m1", "order-1", "card-1", "another-app"),
    ]
    assert [None] * 4 == [releases.find("cc-1", key) for key in others]


async def test_a_failed_attempt_is_forgotten_so_a_repeat_starts_afresh() -> None:
    """Waiting repeats get the failure; later ones find nothing and try again."""
    releases: Releases[str] = Releases()
    release = releases.start("cc-1", KEY)
    waiting = releases.find("cc-1", KEY)
    assert waiting is not None
    release.fail(FlexUnavailable("Flex answered 503"))
    with pytest.raises(FlexUnavailable):
        await waiting
    assert (None, 0) == (releases.find("cc-1", KEY), len(releases))


async def test_a_result_is_kept_until_its_token_expires() -> None:
    """A success is replayed until keep_until, then no more."""
    clock = Clock()
    releases: Releases[str] = Releases(clock=clock)
    releases.start("cc-1", KEY).finish("tt-1", keep_until=1900.0)
    kept = releases.find("cc-1", KEY)
    assert kept is not None
    assert "tt-1" == await kept
    clock.now = 1900.0
    assert releases.find("cc-1", KEY) is None


async def test_another_requests_attempt_under_the_context_leaves_this_one_alone() -> None:
    """Another request starting and failing under the same context cannot remove this entry."""
    releases: Releases[str] = Releases()
    running = releases.start("cc-1", KEY)
    intruder = releases.start("cc-1", ReleaseKey("m1", "order-0", "card-1"))
    intruder.fail(FlexUnavailable("refused"))
    found = releases.find("cc-1", KEY)
    assert found is running.result
    running.finish("tt-1", keep_until=2000.0)
    assert "tt-1" == await asyncio.wait_for(found, 5)


async def test_a_newer_attempt_is_not_forgotten_by_an_older_one_failing() -> None:
    """An attempt of the same request replaced by a newer one cannot remove it."""
    releases: Releases[str] = Releases()
    older = releases.start("cc-1", KEY)
    newer = releases.start("cc-1", KEY)
    older.fail(FlexUnavailable("Flex answered 503"))
    found = releases.find("cc-1", KEY)
    assert found is newer.result
    newer.finish("tt-2", keep_until=2000.0)
    assert "tt-2" == await asyncio.wait_for(found, 5)
