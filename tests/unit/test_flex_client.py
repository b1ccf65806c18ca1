"""The Flex client through httpx.MockTransport: error envelopes, retries, Digest, key fetches."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from relay.config import FlexConfig, FlexCredentials
from relay.errors import (
    CaptureContextInvalid,
    FlexAuthFailed,
    FlexRejected,
    FlexResponseInvalid,
    FlexUnavailable,
)
from relay.flex.client import FlexClient
from relay.flex.keys import PublicKeyStore
from relay.flex.signing import body_digest, decode_shared_secret
from tests import fakes

CREDENTIALS = FlexCredentials("m1", "k1", decode_shared_secret("c2VjcmV0"))
CONFIG = FlexConfig(
    base_url="https://flex.test", credentials=CREDENTIALS, backoff_initial=0.01, max_attempts=3
)
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJhIjoxfQ.c2ln"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """Records sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture(scope="module")
def keys() -> fakes.FlexKeys:
    return fakes.FlexKeys.generate()


def client(handler: Handler, sleep: Recorder | None = None, *, config: FlexConfig = CONFIG):
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return http, FlexClient(http, config, sleep=sleep or Recorder(), clock=lambda: fakes.NOW + 1)


def sequence(*responses: httpx.Response) -> tuple[Handler, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return handler, seen


async def test_create_session_posts_the_field_spec_signed() -> None:
    """The sessions call sends the JSON field spec, signed, and returns the raw JWT."""
    handler, seen = sequence(httpx.Response(201, text=JWT))
    http, flex = client(handler)
    async with http:
        assert JWT == await flex.create_session()
    request = seen[0]
    assert ("https://flex.test/flex/v2/sessions", "m1", body_digest(request.content)) == (
        str(request.url),
        request.headers["v-c-merchant-id"],
        request.headers["digest"],
    )
    assert "paymentInformation" in json.loads(request.content)["fields"]


async def test_session_retries_5xx_then_succeeds() -> None:
    """A 503 then a 201 succeeds after one backoff sleep."""
    handler, seen = sequence(httpx.Response(503), httpx.Response(201, text=JWT))
    sleep = Recorder()
    http, flex = client(handler, sleep)
    async with http:
        assert JWT == await flex.create_session()
    assert (2, 1) == (len(seen), len(sleep.delays))


async def test_session_gives_up_after_max_attempts() -> None:
    """Three 503s raise FlexUnavailable carrying the status."""
    handler, seen = sequence(*[httpx.Response(503)] * 3)
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexUnavailable) as info:
            await flex.create_session()
    assert (3, 503) == (len(seen), info.value.http_status)


async def test_429_retry_after_is_honoured() -> None:
    """A 429 with Retry-After: 1 makes the next sleep at least 1 s (capped by backoff_max)."""
    handler, _ = sequence(
        httpx.Response(429, headers={"Retry-After": "1"}), httpx.Response(201, text=JWT)
    )
    sleep = Recorder()
    http, flex = client(handler, sleep)
    async with http:
        await flex.create_session()
    assert sleep.delays[0] >= 1.0


async def test_401_rmsg_becomes_auth_failed_without_retry() -> None:
    """The gateway's 401 {"response":{"rmsg":...}} is FlexAuthFailed, not retried."""
    body = {"response": {"rmsg": "Authentication Failed"}}
    handler, seen = sequence(httpx.Response(401, json=body))
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexAuthFailed):
            await flex.create_session()
    assert 1 == len(seen)


async def test_400_envelope_keeps_the_flex_reason() -> None:
    """A 400 with a responseStatus envelope becomes FlexRejected carrying its reason."""
    body = {"responseStatus": {"status": 400, "reason": "INVALID_DATA", "message": "m"}}
    handler, _ = sequence(httpx.Response(400, json=body))
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexRejected) as info:
            await flex.create_session()
    assert ("INVALID_DATA", 400) == (info.value.flex_reason, info.value.http_status)


async def test_flat_error_shape_is_understood_too() -> None:
    """The spec's flat {reason, message} shape also yields the reason."""
    handler, _ = sequence(httpx.Response(400, json={"reason": "CAPTURE_CONTEXT_INVALID"}))
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexRejected) as info:
            await flex.create_session()
    assert "CAPTURE_CONTEXT_INVALID" == info.value.flex_reason


async def test_reason_with_odd_characters_is_dropped() -> None:
    """A reason that is not an upper-case code is not carried (it could echo input)."""
    body = {"responseStatus": {"reason": "bad 4111 1111 1111 1111"}}
    handler, _ = sequence(httpx.Response(400, json=body))
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexRejected) as info:
            await flex.create_session()
    assert "" == info.value.flex_reason


async def test_success_without_a_jwt_is_invalid() -> None:
    """A 201 whose body is not a compact JWS is FlexResponseInvalid."""
    handler, _ = sequence(httpx.Response(201, json={"not": "a jwt"}))
    http, flex = client(handler)
    async with http:
        with pytest.raises(FlexResponseInvalid):
            await flex.create_session()


async def test_transport_error_is_unavailable() -> None:
    """A connection error becomes FlexUnavailable after the retries."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    http, flex = client(refuse)
    async with http:
        with pytest.raises(FlexUnavailable, match="unreachable"):
            await flex.create_session()


async def test_no_credentials_means_no_sessions() -> None:
    """A client without credentials refuses to create sessions and sends nothing."""
    handler, seen = sequence()
    http, flex = client(handler, config=FlexConfig(base_url="https://flex.test"))
    async with http:
        with pytest.raises(FlexAuthFailed):
            await flex.create_session()
    assert [] == seen


def key_server(keys: fakes.FlexKeys, seen: list[str]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/flex/v2/public-keys/zu":
            return httpx.Response(200, json=keys.long_term_jwk())
        return httpx.Response(404, json={"responseStatus": {"reason": "NOT_FOUND"}})

    return handler


async def test_context_is_verified_with_a_key_from_the_base_url_and_cached(keys) -> None:
    """The key comes from base_url/public-keys/{kid}, once, however many contexts use it."""
    seen: list[str] = []
    http, flex = client(key_server(keys, seen))
    token = fakes.sign_context(keys, fakes.context_claims(keys))
    config = FlexConfig(base_url="https://flex.test", allowed_origins=frozenset({fakes.ORIGIN}))
    flex = FlexClient(http, config, clock=lambda: fakes.NOW + 1)
    async with http:
        for _ in range(3):
            assert "rOAksGcp8Bgg6WLj" == (await flex.verify_capture_context(token)).jti
    assert ["https://flex.test/flex/v2/public-keys/zu"] == seen


async def test_unknown_kid_is_an_invalid_context(keys) -> None:
    """A kid Flex does not know (404) makes the context invalid."""
    seen: list[str] = []
    other = fakes.FlexKeys(keys.long_term, keys.one_time, kid="qq")
    token = fakes.sign_context(other, fakes.context_claims(other))
    http, flex = client(key_server(keys, seen))
    async with http:
        with pytest.raises(CaptureContextInvalid, match="unknown key"):
            await flex.verify_capture_context(token)


async def test_kid_with_path_characters_is_refused_without_a_request(keys) -> None:
    """A kid like ../x never reaches a URL."""
    seen: list[str] = []
    token = fakes.compact({"kid": "../admin", "alg": "RS256"}, fakes.context_claims(keys), b"s")
    http, flex = client(key_server(keys, seen))
    async with http:
        with pytest.raises(CaptureContextInvalid, match="kid"):
            await flex.verify_capture_context(token)
    assert [] == seen


async def test_rotated_key_is_refetched_once(keys) -> None:
    """When the cached key no longer verifies, the store refetches and the new key verifies."""
    rotated = fakes.FlexKeys.generate()
    served = [keys.long_term_jwk(), rotated.long_term_jwk()]
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json=served[min(len(seen), 2) - 1])

    now = [0.0]
    config = FlexConfig(base_url="https://flex.test", allowed_origins=frozenset({fakes.ORIGIN}))
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    flex = FlexClient(http, config, clock=lambda: fakes.NOW + 1)
    flex.keys = PublicKeyStore(flex.fetch_public_key, clock=lambda: now[0])
    async with http:
        await flex.verify_capture_context(fakes.sign_context(keys, fakes.context_claims(keys)))
        now[0] = 1000.0
        new_token = fakes.sign_context(rotated, fakes.context_claims(rotated))
        assert "rOAksGcp8Bgg6WLj" == (await flex.verify_capture_context(new_token)).jti
    assert 2 == len(seen)


async def test_post_token_checks_the_digest(keys) -> None:
    """A tokens response whose Digest does not match its body is refused."""
    ctx = await _context(keys)
    handler, _ = sequence(httpx.Response(200, text=JWT, headers={"Digest": body_digest(b"x")}))
    http, flex = client(handler, config=_pci_config())
    async with http:
        with pytest.raises(FlexResponseInvalid, match="Digest"):
            await flex.post_token(ctx, "a.b.c.d.e")


async def test_post_token_sends_raw_jwt_to_the_context_origin(keys) -> None:
    """The JWE goes raw, as application/jwt, to flx.origin + flx.path, unauthenticated."""
    ctx = await _context(keys)
    body = JWT.encode()
    handler, seen = sequence(
        httpx.Response(200, content=body, headers={"Digest": body_digest(body)})
    )
    http, flex = client(handler, config=_pci_config())
    async with http:
        assert JWT == await flex.post_token(ctx, "a.b.c.d.e")
    request = seen[0]
    assert ("https://flex.test/flex/v2/tokens", b"a.b.c.d.e", None) == (
        str(request.url),
        request.content,
        request.headers.get("signature"),
    )
    assert request.headers["content-type"].startswith("application/jwt")


async def test_post_token_is_not_retried(keys) -> None:
    """A 503 from /tokens is FlexUnavailable at once: the caller decides about a fresh session."""
    ctx = await _context(keys)
    handler, seen = sequence(httpx.Response(503), httpx.Response(200, text=JWT))
    http, flex = client(handler, config=_pci_config())
    async with http:
        with pytest.raises(FlexUnavailable):
            await flex.post_token(ctx, "a.b.c.d.e")
    assert 1 == len(seen)


def _pci_config() -> FlexConfig:
    return FlexConfig(base_url="https://flex.test", allowed_origins=frozenset({fakes.ORIGIN}))


async def _context(keys: fakes.FlexKeys):
    seen: list[str] = []
    http = httpx.AsyncClient(transport=httpx.MockTransport(key_server(keys, seen)))
    flex = FlexClient(http, _pci_config(), clock=lambda: fakes.NOW + 1)
    async with http:
        return await flex.verify_capture_context(
            fakes.sign_context(keys, fakes.context_claims(keys))
        )
