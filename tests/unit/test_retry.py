"""with_retries: full-jitter backoff on FlexUnavailable only, with Retry-After honoured."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from relay.errors import FlexRejected, FlexUnavailable, RelayError
from relay.flex.retry import with_retries


class Sleeps:
    """An injected sleep that records each delay instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class Script:
    """A call that raises the scripted errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def unavailable(retry_after: float | None = None) -> FlexUnavailable:
    return FlexUnavailable("Flex answered 503", http_status=503, retry_after=retry_after)


async def run(  # noqa: PLR0913  mirrors with_retries' knobs
    call: Script,
    sleeps: Sleeps,
    *,
    attempts: int = 3,
    initial: float = 0.1,
    maximum: float = 2.0,
    rng: Callable[[], float] = lambda: 1.0,
) -> str:
    return await with_retries(
        call, attempts=attempts, initial=initial, maximum=maximum, sleep=sleeps, rng=rng
    )


async def test_success_first_time_does_not_sleep():
    """A call that succeeds at once is made once and never sleeps."""
    call, sleeps = Script(), Sleeps()
    assert "ok" == await run(call, sleeps)
    assert 1 == call.calls
    assert [] == sleeps.delays


async def test_two_failures_then_success_sleeps_twice_within_the_cap():
    """Two FlexUnavailable then success, with random jitter, sleeps twice within [0, cap]."""
    call, sleeps = Script(unavailable(), unavailable()), Sleeps()
    rng = random.Random(7).random  # noqa: S311  jitter, not cryptography
    assert "ok" == await run(call, sleeps, attempts=3, initial=0.1, maximum=2.0, rng=rng)
    assert 3 == call.calls
    assert 2 == len(sleeps.delays)
    assert [True, True] == [
        0.0 <= delay <= cap for delay, cap in zip(sleeps.delays, [0.1, 0.2], strict=True)
    ]


async def test_the_cap_doubles_per_attempt_up_to_the_maximum():
    """With jitter pinned to 1 the sleeps are initial*1, initial*2, then bounded by maximum."""
    call, sleeps = Script(*(unavailable() for _ in range(4))), Sleeps()
    assert "ok" == await run(call, sleeps, attempts=5, initial=0.1, maximum=0.3)
    assert pytest.approx([0.1, 0.2, 0.3, 0.3]) == sleeps.delays


async def test_jitter_scales_the_cap():
    """The rng's draw multiplies the cap (full jitter), so a draw of 0.5 sleeps half of it."""
    call, sleeps = Script(unavailable(), unavailable()), Sleeps()
    assert "ok" == await run(call, sleeps, initial=0.1, maximum=2.0, rng=lambda: 0.5)
    assert pytest.approx([0.05, 0.1]) == sleeps.delays


async def test_exhausted_attempts_reraise_the_last_error():
    """When every attempt fails the last FlexUnavailable is raised, after attempts-1 sleeps."""
    errors = [unavailable() for _ in range(3)]
    call, sleeps = Script(*errors), Sleeps()
    with pytest.raises(FlexUnavailable) as info:
        await run(call, sleeps, attempts=3)
    assert errors[2] is info.value
    assert 3 == call.calls
    assert 2 == len(sleeps.delays)


async def test_a_single_attempt_never_sleeps():
    """attempts=1 makes one call and raises its FlexUnavailable without sleeping."""
    call, sleeps = Script(unavailable()), Sleeps()
    with pytest.raises(FlexUnavailable):
        await run(call, sleeps, attempts=1)
    assert (1, []) == (call.calls, sleeps.delays)


@pytest.mark.parametrize(
    "error",
    [
        FlexRejected("Flex refused the request", http_status=400, flex_reason="VALIDATION"),
        RelayError("internal error"),
    ],
    ids=["FlexRejected", "RelayError"],
)
async def test_a_non_retryable_error_is_raised_at_once(error: RelayError):
    """An error other than FlexUnavailable is raised from the first call without sleeping."""
    call, sleeps = Script(error, unavailable()), Sleeps()
    with pytest.raises(type(error)) as info:
        await run(call, sleeps, attempts=5)
    assert error is info.value
    assert (1, []) == (call.calls, sleeps.delays)


async def test_retry_after_sets_a_floor_under_the_jitter():
    """A Retry-After of 0.5 s with a jitter draw of 0 sleeps 0.5 s."""
    call, sleeps = Script(unavailable(retry_after=0.5)), Sleeps()
    assert "ok" == await run(call, sleeps, initial=0.1, maximum=2.0, rng=lambda: 0.0)
    assert [0.5] == sleeps.delays


async def test_retry_after_is_capped_by_the_maximum():
    """A Retry-After longer than the maximum sleeps the maximum."""
    call, sleeps = Script(unavailable(retry_after=30.0)), Sleeps()
    assert "ok" == await run(call, sleeps, initial=0.1, maximum=2.0, rng=lambda: 0.0)
    assert [2.0] == sleeps.delays


async def test_jitter_above_a_short_retry_after_wins():
    """When the jittered delay exceeds the Retry-After hint, the longer jittered delay is slept."""
    call, sleeps = Script(unavailable(retry_after=0.05)), Sleeps()
    assert "ok" == await run(call, sleeps, initial=0.1, maximum=2.0, rng=lambda: 1.0)
    assert [0.1] == sleeps.delays
