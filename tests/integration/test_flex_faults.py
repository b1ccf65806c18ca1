"""The client against simulators injecting faults: 5xx, 429, dropped connections, latency.

Attempts are counted with an httpx request hook on the client's AsyncClient, and backoff sleeps
are recorded instead of slept, so these tests wait only for the simulator itself. A held tokens
response is observed through the simulator's log lines, as a crash-window test observes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import pytest

from relay.errors import CaptureContextInvalid, FlexUnavailable
from tests.cards_testdata import TEST_CARDS
from tests.integration.conftest import (
    SESSIONS_PATH,
    FlexSim,
    MakeRig,
    Rig,
    StartFlexSim,
    assert_no_pan_in_error,
    make_card,
    module_flexsim,
    token_claims,
)

VISA = TEST_CARDS[0].digits
PUBLIC_KEYS_PATH = "/flex/v2/public-keys/"
TOKENS_PATH = "/flex/v2/tokens"
EVENT_TIMEOUT = 20.0
"""A generous bound on waiting for a simulator log line; it normally comes within milliseconds."""


failing = module_flexsim("--fault-error-rate", "1")
throttling = module_flexsim("--fault-throttle-rate", "1")
dropping = module_flexsim("--fault-drop-rate", "1")
slow = module_flexsim("--fault-latency-ms", "500")


def backoff_caps(rig: Rig) -> list[float]:
    """The upper bound of each backoff sleep between max_attempts attempts."""
    config = rig.config
    return [
        min(config.backoff_max, config.backoff_initial * 2**attempt)
        for attempt in range(config.max_attempts - 1)
    ]


async def test_5xx_on_sessions_is_retried_then_flex_unavailable(
    failing: FlexSim, make_rig: MakeRig
) -> None:
    """A simulator answering 503 to everything gets max_attempts POSTs, then FlexUnavailable."""
    rig = make_rig(config=failing.config(max_attempts=4))
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.create_session()
    assert (503, "SERVICE_UNAVAILABLE", 4, 3) == (
        caught.value.http_status,
        caught.value.flex_reason,
        len(rig.sent_to(SESSIONS_PATH)),
        len(rig.sleeps),
    )
    assert [True] * 3 == [
        0 <= slept <= cap for slept, cap in zip(rig.sleeps, backoff_caps(rig), strict=True)
    ]
    assert_no_pan_in_error(caught.value)


async def test_5xx_on_public_keys_is_retried_and_not_mistaken_for_a_bad_context(
    failing: FlexSim, flexsim: FlexSim, make_rig: MakeRig
) -> None:
    """A failing key fetch surfaces as FlexUnavailable after retries, not CaptureContextInvalid."""
    cc = await make_rig(flexsim).flex.create_session()
    rig = make_rig(failing)
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.verify_capture_context(cc)
    assert (False, 3, 2) == (
        isinstance(caught.value, CaptureContextInvalid),
        len(rig.sent_to(PUBLIC_KEYS_PATH)),
        len(rig.sleeps),
    )


async def test_5xx_on_tokens_is_not_retried(
    failing: FlexSim, flexsim: FlexSim, make_rig: MakeRig
) -> None:
    """posting a JWE is not idempotent: one 503 raises FlexUnavailable with no retry."""
    healthy = make_rig(flexsim)
    ctx = await healthy.flex.verify_capture_context(await healthy.flex.create_session())
    jwe = healthy.flex.encrypt_card(ctx, make_card(VISA))
    rig = make_rig(failing)
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.post_token(dataclasses.replace(ctx, origin=failing.url), jwe)
    assert (503, 1, []) == (caught.value.http_status, len(rig.sent_to(TOKENS_PATH)), rig.sleeps)
    assert_no_pan_in_error(caught.value)


@pytest.mark.parametrize(
    ("backoff_max", "floor", "ceiling"),
    [(2.0, 1.0, 2.0), (0.5, 0.5, 0.5)],
    ids=["hint_under_max", "hint_capped_by_max"],
)
async def test_429_is_retried_honouring_retry_after(
    throttling: FlexSim, make_rig: MakeRig, backoff_max: float, floor: float, ceiling: float
) -> None:
    """A 429 with Retry-After: 1 is retried, each sleep at least min(1 s, backoff_max)."""
    rig = make_rig(config=throttling.config(backoff_max=backoff_max))
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.create_session()
    assert (429, "TOO_MANY_REQUESTS", 1.0, 3) == (
        caught.value.http_status,
        caught.value.flex_reason,
        caught.value.retry_after,
        len(rig.sent),
    )
    assert [True, True] == [floor <= slept <= ceiling for slept in rig.sleeps]


async def test_dropped_connections_are_retried_then_flex_unavailable(
    dropping: FlexSim, make_rig: MakeRig
) -> None:
    """A connection closed mid-response is retried max_attempts times, then FlexUnavailable."""
    rig = make_rig(dropping)
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.create_session()
    assert (0, 3, 2) == (caught.value.http_status, len(rig.sent), len(rig.sleeps))
    assert isinstance(caught.value.__cause__, httpx.TransportError)


async def test_latency_over_the_timeout_is_flex_unavailable(
    slow: FlexSim, make_rig: MakeRig
) -> None:
    """A simulator slower than the client's timeout is FlexUnavailable once attempts time out."""
    rig = make_rig(config=slow.config(timeout=0.2, max_attempts=2))
    with pytest.raises(FlexUnavailable) as caught:
        await rig.flex.create_session()
    assert (2, 1, True) == (
        len(rig.sent),
        len(rig.sleeps),
        isinstance(caught.value.__cause__, httpx.TimeoutException),
    )


async def test_latency_under_the_timeout_only_slows_the_call(
    slow: FlexSim, make_rig: MakeRig
) -> None:
    """With a timeout above the added latency the session succeeds on the first attempt."""
    rig = make_rig(config=slow.config(timeout=5.0))
    cc = await rig.flex.create_session()
    assert (3, 1, []) == (len(cc.split(".")), len(rig.sent), rig.sleeps)


async def test_a_503_then_success_recovers_with_one_backoff(
    flexsim: FlexSim, make_rig: MakeRig
) -> None:
    """A first 503 from MockTransport, then the real simulator: the retried session verifies."""
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=10.0) as upstream:

        async def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request.url.path)
            if seen.count(SESSIONS_PATH) == 1 and request.url.path == SESSIONS_PATH:
                envelope = {"status": 503, "reason": "SERVICE_UNAVAILABLE", "message": "busy"}
                return httpx.Response(503, json={"responseStatus": envelope})
            real = await upstream.request(
                request.method, request.url, headers=request.headers, content=request.content
            )
            return httpx.Response(
                real.status_code,
                headers={"content-type": real.headers["content-type"]},
                content=real.content,
            )

        rig = make_rig(
            config=flexsim.config(), http=httpx.AsyncClient(transport=httpx.MockTransport(handler))
        )
        ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    assert [SESSIONS_PATH, SESSIONS_PATH, PUBLIC_KEYS_PATH + ctx.kid] == seen
    assert [True] == [0 <= slept <= backoff_caps(rig)[0] for slept in rig.sleeps]


async def logged(sim: FlexSim, event: str) -> dict[str, Any]:
    """The simulator's first log line with this event, once it has been written."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not (found := sim.events(event)):
        if sim.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {event} line; flexsim wrote:\n{sim.output[-4000:]}", pytrace=False)
        await asyncio.sleep(0.01)
    return found[0]


async def test_hold_after_issue_logs_the_token_while_the_response_is_held(
    flexsim_factory: StartFlexSim, make_rig: MakeRig
) -> None:
    """The token-issued line appears while the POST still waits; the response then brings it."""
    sim = flexsim_factory("--fault-hold-after-issue-ms", "2000")
    rig = make_rig(sim)
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA))
    posting = asyncio.create_task(rig.flex.post_token(ctx, jwe))
    issued = await logged(sim, "flexsim_token_issued")
    still_waiting = not posting.done()
    token = await posting
    ended = await logged(sim, "flexsim_hold_ended")
    assert (True, token_claims(token)["jti"], ctx.one_time_kid, False) == (
        still_waiting,
        issued["jti"],
        issued["kid"],
        ended["client_gone"],
    )


async def test_hold_after_issue_ends_when_the_client_goes(
    flexsim_factory: StartFlexSim, make_rig: MakeRig
) -> None:
    """A client that disconnects during a long hold ends it: the simulator notices at once."""
    sim = flexsim_factory("--fault-hold-after-issue-ms", "600000")
    rig = make_rig(sim)
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA))
    posting = asyncio.create_task(rig.flex.post_token(ctx, jwe))
    await logged(sim, "flexsim_token_issued")
    posting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await posting
    await rig.http.aclose()
    ended = await logged(sim, "flexsim_hold_ended")
    assert (True, 1) == (ended["client_gone"], len(sim.events("flexsim_token_issued")))
