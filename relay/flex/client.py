"""The Flex API v2 client, async over one shared httpx.AsyncClient.

create_session signs with HTTP Signature (merchant side only). Public keys come only from the
configured base URL, never from anything inside a token. post_token sends the JWE to the
context's origin, which verify_capture_context has already checked against the allow-list.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import httpx

from relay.cards import CardData
from relay.config import FlexConfig
from relay.errors import (
    CaptureContextInvalid,
    FlexAuthFailed,
    FlexRejected,
    FlexResponseInvalid,
    FlexUnavailable,
    PublicKeyNotFound,
)
from relay.flex import jose
from relay.flex.fields import DEFAULT_FIELDS, FieldSpec, session_request_body
from relay.flex.keys import PublicKeyStore
from relay.flex.models import CaptureContext, TransientToken
from relay.flex.retry import Sleep, with_retries
from relay.flex.signing import HTTPSignatureAuth, body_digest

SESSIONS_PATH = "/flex/v2/sessions"
PUBLIC_KEYS_PATH = "/flex/v2/public-keys/"
JWT_CONTENT_TYPE = "application/jwt; charset=utf-8"
JSON_CONTENT_TYPE = "application/json;charset=utf-8"
_COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
_SAFE_KID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
T = TypeVar("T")


def new_http_client(config: FlexConfig, *, max_connections: int = 32) -> httpx.AsyncClient:
    """The one AsyncClient a process shares: keep-alive, a capped pool, timeouts on every call."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        verify=ssl.create_default_context(cafile=config.ca_file) if config.ca_file else True,
        follow_redirects=False,
    )


class FlexClient:
    """Sessions, public keys, tokens, and the JOSE checks around them."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        config: FlexConfig,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        keys: PublicKeyStore | None = None,
    ) -> None:
        """Use the shared http client; sleep, clock and the key store are injectable for tests."""
        self._http = http
        self._config = config
        self._sleep = sleep
        self._clock = clock
        self._auth = (
            HTTPSignatureAuth(
                config.credentials.merchant_id,
                config.credentials.key_id,
                config.credentials.shared_secret,
                clock=clock,
            )
            if config.credentials
            else None
        )
        self.keys = keys or PublicKeyStore(self.fetch_public_key)

    async def create_session(self, fields: Sequence[FieldSpec] = DEFAULT_FIELDS) -> str:
        """Create a capture context for these fields; returns the raw, unverified JWT."""
        if self._auth is None:
            raise FlexAuthFailed("no Flex credentials are configured for creating sessions")
        body = json.dumps(session_request_body(fields)).encode("utf-8")
        headers = {"Content-Type": JSON_CONTENT_TYPE, "Accept": "application/jwt"}

        async def attempt() -> str:
            response = await self._send("POST", SESSIONS_PATH, content=body, headers=headers)
            return _jwt_body(response, "sessions")

        return await self._retrying(attempt)

    async def verify_capture_context(
        self, unverified_cc: str, *, ignore_expiry: bool = False
    ) -> CaptureContext:
        """Verify a capture context with the Flex key its kid names; refetch once on rotation.

        ignore_expiry: only for a context of our own sent before, whose answer is asked again.
        """
        kid = jose.context_kid(unverified_cc)
        if not _SAFE_KID.fullmatch(kid):
            raise CaptureContextInvalid("capture context kid has unexpected characters")
        try:
            key = await self.keys.get(kid)
        except PublicKeyNotFound:
            raise CaptureContextInvalid(
                "capture context is signed by an unknown key", kid=kid
            ) from None
        try:
            return self._verify_with(unverified_cc, key, ignore_expiry)
        except CaptureContextInvalid:
            if jose.signature_valid(unverified_cc, key):
                raise
            fresh = await self.keys.refresh(kid)
            if fresh is None or fresh == key:
                raise
            return self._verify_with(unverified_cc, fresh, ignore_expiry)

    def encrypt_card(self, ctx: CaptureContext, card: CardData) -> str:
        """The compact JWE of exactly the fields ctx asks for (pci side only)."""
        return jose.encrypt_card_jwe(card, ctx)

    async def post_token(self, ctx: CaptureContext, jwe: str) -> str:
        """POST the JWE to flx.origin + flx.path and return the transient token string."""
        if ctx.origin not in self._config.origins:
            raise CaptureContextInvalid("capture context origin is not allowed", jti=ctx.jti)
        headers = {"Content-Type": JWT_CONTENT_TYPE, "Accept": "application/jwt"}
        response = await self._send(
            "POST", ctx.tokens_url, content=jwe.encode("ascii"), headers=headers
        )
        token = _jwt_body(response, "tokens")
        digest = response.headers.get("digest")
        if digest is not None and not hmac.compare_digest(digest, body_digest(response.content)):
            raise FlexResponseInvalid("tokens response Digest does not match its body", jti=ctx.jti)
        return token

    def verify_transient_token(self, unverified_tt: str, ctx: CaptureContext) -> TransientToken:
        """Verify a transient token against the context it was issued for."""
        return jose.verify_transient_token(
            unverified_tt, ctx, now=self._clock(), leeway=self._config.leeway
        )

    def _verify_with(
        self, unverified_cc: str, key: Mapping[str, str], ignore_expiry: bool
    ) -> CaptureContext:
        return jose.verify_capture_context(
            unverified_cc,
            key,
            now=self._clock(),
            allowed_origins=self._config.origins,
            leeway=self._config.leeway,
            ignore_expiry=ignore_expiry,
        )

    async def fetch_public_key(self, kid: str) -> Mapping[str, str] | None:
        """GET /public-keys/{kid} from the base URL: the JWK, or None if Flex does not know it."""

        async def attempt() -> Mapping[str, str] | None:
            response = await self._send(
                "GET", PUBLIC_KEYS_PATH + kid, headers={"Accept": "application/json"}
            )
            if response.status_code == 404:
                return None
            _raise_for_status(response, "public-keys")
            return _public_key_body(response, kid)

        return await self._retrying(attempt)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]]) -> T:
        return await with_retries(
            attempt,
            attempts=self._config.max_attempts,
            initial=self._config.backoff_initial,
            maximum=self._config.backoff_max,
            sleep=self._sleep,
        )

    async def _send(
        self,
        method: str,
        url_or_path: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
    ) -> httpx.Response:
        url = url_or_path if "://" in url_or_path else self._config.base_url + url_or_path
        auth = self._auth if url_or_path == SESSIONS_PATH else None
        try:
            return await self._http.request(
                method, url, content=content, headers=headers, auth=auth or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TimeoutException as exc:
            raise FlexUnavailable(f"Flex {method} {_path(url)} timed out") from exc
        except httpx.TransportError as exc:
            raise FlexUnavailable(f"Flex {method} {_path(url)} unreachable") from exc


def _path(url: str) -> str:
    return httpx.URL(url).path


def _jwt_body(response: httpx.Response, what: str) -> str:
    _raise_for_status(response, what)
    text = response.text.strip()
    if not _COMPACT_JWS.match(text):
        raise FlexResponseInvalid(f"Flex {what} answered {response.status_code} without a JWT")
    return text


def _public_key_body(response: httpx.Response, kid: str) -> Mapping[str, str]:
    try:
        key = jose.validate_public_jwk(response.json())
    except ValueError:
        raise FlexResponseInvalid("Flex public-keys answered an unusable key", kid=kid) from None
    if key.get("kid", kid) != kid:
        raise FlexResponseInvalid("Flex public-keys answered a key for another kid", kid=kid)
    return key


def _raise_for_status(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    reason = _flex_reason(response)
    text = f"Flex {what} answered {status}" + (f" {reason}" if reason else "")
    if status == 401:
        raise FlexAuthFailed(
            text, http_status=status, flex_reason=reason or "AUTHENTICATION_FAILED"
        )
    if status == 429 or status >= 500:
        raise FlexUnavailable(
            text, http_status=status, flex_reason=reason, retry_after=_retry_after(response)
        )
    raise FlexRejected(text, http_status=status, flex_reason=reason)


def _flex_reason(response: httpx.Response) -> str:
    """The reason code from whichever error envelope Flex used; only [A-Z0-9_] survives."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    envelope = body.get("responseStatus", body)
    reason = envelope.get("reason", "") if isinstance(envelope, dict) else ""
    return reason if isinstance(reason, str) and re.fullmatch(r"[A-Z0-9_]{1,64}", reason) else ""


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None
