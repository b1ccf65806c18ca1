"""Fault injection for reliability tests: latency, 5xx, 429, dropped and held responses.

Off by default. A pure ASGI middleware, so a drop can happen after the response has started:
the client then sees a connection closed mid-response, as it would on a real network fault.
A hold delays a successful tokens response after the token was issued (and logged as
`flexsim_token_issued`): the window in which a client may crash holding nothing although Flex
has already issued a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_log = structlog.get_logger("relay.dev.flexsim")


@dataclass(slots=True)
class Faults:
    """Fault rates (0..1) and added latency; mutable so a test can change them mid-run."""

    latency: float = 0.0
    """Seconds added before each affected request is handled."""
    error_rate: float = 0.0
    """Share of requests answered 503 with a responseStatus envelope."""
    throttle_rate: float = 0.0
    """Share of requests answered 429 with Retry-After: 1."""
    drop_rate: float = 0.0
    """Share of requests whose connection is closed after the response started."""
    hold_after_issue: float = 0.0
    """Seconds a tokens response that carries an issued token is held before it is sent (ended
    early if the client disconnects); 0 is off. Other endpoints are never held."""
    paths: frozenset[str] = field(
        default_factory=lambda: frozenset({"sessions", "tokens", "public-keys"})
    )
    """Which endpoints are affected: sessions, tokens, public-keys."""


class DroppedConnection(Exception):
    """Raised mid-response so that the server closes the connection."""


class FaultMiddleware:
    """Applies Faults to /flex/v2/ endpoints."""

    def __init__(
        self, app: ASGIApp, faults: Faults, rng: Callable[[], float] = random.random
    ) -> None:
        """Wrap the app."""
        self._app = app
        self.faults = faults
        self._rng = rng

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Inject a fault or pass the request through."""
        endpoint = _endpoint(scope)
        if endpoint is None or endpoint not in self.faults.paths:
            await self._app(scope, receive, send)
            return
        faults = self.faults
        if faults.latency > 0:
            await asyncio.sleep(faults.latency)
        if faults.drop_rate and self._rng() < faults.drop_rate:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"64")],
                }
            )
            raise DroppedConnection
        if faults.error_rate and self._rng() < faults.error_rate:
            await _send_fault(
                send, 503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable"
            )
            return
        if faults.throttle_rate and self._rng() < faults.throttle_rate:
            await _send_fault(send, 429, "TOO_MANY_REQUESTS", "Too many requests", retry_after=True)
            return
        if endpoint == "tokens" and faults.hold_after_issue > 0:
            send = _holding(send, receive, faults.hold_after_issue)
        await self._app(scope, receive, send)


def _holding(send: Send, receive: Receive, seconds: float) -> Send:
    """send, except that a 200 response waits first: the app has issued and logged the token."""

    async def held(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            client_gone = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_disconnect(receive), seconds)
                client_gone = True
            # A crash-window test waits for this line to know the hold is over, and how.
            _log.info("flexsim_hold_ended", client_gone=client_gone)
        await send(message)

    return held


async def _disconnect(receive: Receive) -> None:
    """Return when the client has gone; the app has read the whole body by now."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _endpoint(scope: Scope) -> str | None:
    if scope["type"] != "http":
        return None
    path: str = scope["path"]
    for name in ("sessions", "tokens", "public-keys"):
        if path.startswith(f"/flex/v2/{name}"):
            return name
    return None


async def _send_fault(
    send: Send, status: int, reason: str, message: str, *, retry_after: bool = False
) -> None:
    body = json.dumps(
        {"responseStatus": {"status": status, "reason": reason, "message": message}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
