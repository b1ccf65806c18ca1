"""The simulator's HTTP surface: /flex/v2/sessions, /public-keys/{kid}, /tokens.

FlexSimulator holds the state (keys, merchants, counters); build_app wraps it in Starlette.
Success bodies are raw JWTs; errors use the responseStatus envelope, and authentication
failures the gateway's `{"response": {"rmsg": ...}}` 401.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from relay.dev.flexsim import jwt
from relay.dev.flexsim.auth import AuthFailure, MerchantKey, verify_request
from relay.dev.flexsim.faults import FaultMiddleware, Faults
from relay.dev.flexsim.keys import LongTermKeys, OneTimeKeys, random_id
from relay.dev.flexsim.tokens import (
    ApiError,
    SessionRecord,
    check_fields,
    invalid,
    new_token_jti,
    normalize_data,
    token_content,
)
from relay.errors import InvalidFieldSpec
from relay.flex.fields import parse_session_request
from relay.flex.signing import body_digest

CONTEXT_TYPE = "api-0.1.0"
TOKEN_TTL = 900
MAX_BODY_BYTES = 64 * 1024

_log = structlog.get_logger("relay.dev.flexsim")


@dataclass(slots=True)
class Stats:
    """Counters a test can read to see what the simulator did."""

    sessions: int = 0
    tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class FlexSimulator:
    """The simulator's state and request handling, independent of the HTTP framework."""

    def __init__(  # noqa: PLR0913  the simulator's knobs, all keyword-only
        self,
        merchants: list[MerchantKey],
        *,
        context_ttl: int = 900,
        origin: str | None = None,
        pool_size: int = 32,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Set up keys; origin defaults to the scheme and Host each session was requested at."""
        self.merchants = {merchant.merchant_id: merchant for merchant in merchants}
        self.context_ttl = context_ttl
        self.origin = origin
        self.faults = faults or Faults()
        self.clock = clock
        self.long_term = LongTermKeys(context_ttl, clock=clock)
        self.one_time = OneTimeKeys(pool_size=pool_size, clock=clock)
        self.stats = Stats()
        self._record_key = secrets.token_bytes(32)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FlexSimulator]:
        """Keep the one-time key pool filled while the app serves."""
        await self.one_time.start()
        try:
            yield self
        finally:
            await self.one_time.stop()

    async def create_session(self, request: Request) -> Response:
        """POST /flex/v2/sessions."""
        body = await _body(request)
        try:
            merchant = verify_request(
                method=request.method,
                target=_target(request),
                headers=request.headers,
                body=body,
                merchants=self.merchants,
                now=self.clock(),
            )
        except AuthFailure as exc:
            return self._reject(401, "AUTHENTICATION_FAILED", {"response": {"rmsg": str(exc)}})
        try:
            specs = parse_session_request(json.loads(body))
        except ValueError:
            raise invalid("Request body is not valid JSON") from None
        except InvalidFieldSpec as exc:
            raise invalid(exc.message, exc.ids.get("field", "fields")) from None
        context = await self._capture_context(
            merchant,
            origin=self.origin or f"{request.url.scheme}://{request.headers['host']}",
            required=[s.path for s in specs if s.required],
            optional=[s.path for s in specs if not s.required],
        )
        self.stats.sessions += 1
        return Response(context, status_code=201, media_type="application/jwt")

    async def public_key(self, request: Request) -> Response:
        """GET /flex/v2/public-keys/{kid}: a bare JWK, or 404."""
        kid = request.path_params["kid"]
        signing = self.long_term.find(kid)
        if signing is None:
            raise ApiError(404, "NOT_FOUND", "The requested key was not found")
        return JSONResponse(jwt.public_jwk(signing.key.public_key(), signing.kid))

    async def tokens(self, request: Request) -> Response:
        """POST /flex/v2/tokens: decrypt, check everything, sign the transient token."""
        token = _jwe_from(await _body(request), request.headers.get("content-type", ""))
        values, record, key = self._open_payload(token)
        now = int(self.clock())
        claims = {
            "iss": f"Flex/{record.kid[:2]}",
            "exp": now + TOKEN_TTL,
            "type": CONTEXT_TYPE,
            "iat": now,
            "jti": new_token_jti(),
            "content": token_content(values),
        }
        body = jwt.sign_rs256(claims, key, record.kid).encode("ascii")
        self.stats.tokens += 1
        # Logged before the response is sent (and before any hold fault): a test waits for this
        # line to know Flex has issued the token while the client has not received it yet.
        _log.info(
            "flexsim_token_issued",
            jti=claims["jti"],
            kid=record.kid,
            context_jti=record.jti,
            merchant_id=record.merchant_id,
        )
        return Response(body, media_type="application/jwt", headers={"Digest": body_digest(body)})

    def error_response(self, exc: ApiError) -> Response:
        """Render an ApiError in the responseStatus envelope."""
        envelope: dict[str, Any] = {
            "status": exc.status,
            "reason": exc.reason,
            "message": exc.message,
            "correlationId": str(uuid.uuid4()),
        }
        if exc.location:
            envelope["details"] = [{"location": exc.location, "message": exc.message}]
        return self._reject(exc.status, exc.reason, {"responseStatus": envelope})

    def _reject(self, status: int, reason: str, body: dict[str, Any]) -> Response:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        return JSONResponse(body, status_code=status)

    async def _capture_context(
        self, merchant: MerchantKey, *, origin: str, required: list[str], optional: list[str]
    ) -> str:
        now = int(self.clock())
        exp = now + self.context_ttl
        kid, key = await self.one_time.issue(exp)
        jti = random_id(16)
        claims = {
            "flx": {
                "path": "/flex/v2/tokens",
                "data": SessionRecord(kid, jti, exp, merchant.merchant_id).seal(self._record_key),
                "origin": origin,
                "jwk": jwt.public_jwk(key.public_key(), kid),
            },
            "ctx": [
                {
                    "data": {"requiredFields": required, "optionalFields": optional},
                    "type": CONTEXT_TYPE,
                }
            ],
            "iss": "Flex API",
            "exp": exp,
            "iat": now,
            "jti": jti,
        }
        signing = self.long_term.current
        return jwt.sign_rs256(claims, signing.key, signing.kid)

    def _open_payload(self, token: str) -> tuple[dict[str, str], SessionRecord, Any]:
        try:
            kid = str(jwt.jwe_header(token).get("kid", ""))
        except jwt.TokenError:
            raise invalid("Payload is not a compact JWE") from None
        key = self.one_time.find(kid)
        if key is None:
            raise ApiError(
                400, "CAPTURE_CONTEXT_EXPIRED", "The key for this payload is unknown or expired"
            )
        try:
            payload = json.loads(jwt.decrypt_jwe(token, key))
        except (jwt.TokenError, ValueError):
            raise invalid("Unable to decrypt the payload") from None
        if not isinstance(payload, dict) or payload.get("index") != 0:
            raise invalid("index must be 0", "index")
        record, required, optional = self._check_context(payload.get("context"), kid)
        values = normalize_data(payload.get("data"))
        check_fields(
            values, required, optional, dt.datetime.fromtimestamp(self.clock(), dt.UTC).date()
        )
        return values, record, key

    def _check_context(
        self, context: object, kid: str
    ) -> tuple[SessionRecord, list[str], list[str]]:
        bad = ApiError(400, "CAPTURE_CONTEXT_INVALID", "Capture context is invalid", "context")
        if not isinstance(context, str):
            raise bad
        try:
            signing = self.long_term.find(str(jwt.json_part(context.split(".")[0]).get("kid")))
            if signing is None:
                raise bad
            claims = jwt.verify_rs256(context, signing.key.public_key())
        except jwt.TokenError:
            raise bad from None
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= self.clock():
            raise ApiError(400, "CAPTURE_CONTEXT_EXPIRED", "Capture context has expired", "context")
        flx = claims.get("flx") or {}
        record = SessionRecord.open(flx.get("data"), self._record_key)
        if (
            (flx.get("jwk") or {}).get("kid") != kid
            or record.kid != kid
            or record.jti != claims.get("jti")
        ):
            raise bad
        data = claims["ctx"][0]["data"]
        return record, list(data["requiredFields"]), list(data["optionalFields"])


def build_app(sim: FlexSimulator) -> FaultMiddleware:
    """The ASGI app: Starlette routes behind the fault middleware."""

    async def handle(request: Request, handler: Callable[[Request], Any]) -> Response:
        try:
            response: Response = await handler(request)
        except ApiError as exc:
            return sim.error_response(exc)
        return response

    async def sessions(request: Request) -> Response:
        return await handle(request, sim.create_session)

    async def public_keys(request: Request) -> Response:
        return await handle(request, sim.public_key)

    async def tokens(request: Request) -> Response:
        return await handle(request, sim.tokens)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with sim.running():
            yield

    app = Starlette(
        routes=[
            Route("/flex/v2/sessions", sessions, methods=["POST"]),
            Route("/flex/v2/public-keys/{kid}", public_keys, methods=["GET"]),
            Route("/flex/v2/tokens", tokens, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return FaultMiddleware(app, sim.faults)


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "INVALID_DATA", "Request body is too large")
    return body


def _target(request: Request) -> str:
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    query: bytes = request.scope.get("query_string", b"")
    return (raw_path + (b"?" + query if query else b"")).decode("latin-1")


def _jwe_from(body: bytes, content_type: str) -> str:
    text = body.decode("utf-8", errors="replace").strip()
    if content_type.startswith("application/json"):
        try:
            wrapper = json.loads(text)
        except ValueError:
            raise invalid("Request body is not valid JSON") from None
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("keyId"), str):
            raise invalid("keyId is required", "keyId")
        text = wrapper["keyId"]
    return text
