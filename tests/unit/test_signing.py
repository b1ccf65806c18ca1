"""HTTP Signature: a known-answer vector, the signer's headers, and the verifier's checks."""

from __future__ import annotations

import base64
import hashlib
import hmac

import httpx
import pytest

from relay.dev.flexsim.auth import AuthFailure, MerchantKey, verify_request
from relay.flex.signing import (
    HTTPSignatureAuth,
    body_digest,
    decode_shared_secret,
    parse_signature_header,
    signing_string,
)

SECRET_B64 = "c2VjcmV0LWtleS1mb3ItdGVzdGluZy0zMi1ieXRlcyE="
BODY = b'{"fields": {"paymentInformation": {"card": {"number": {}}}}}'
DATE = "Thu, 18 Jul 2019 00:18:03 GMT"
DATE_EPOCH = 1563409083
# Computed outside Python with: printf '<signing string>' |
#   openssl dgst -sha256 -mac HMAC -macopt hexkey:<hex of the decoded secret> -binary | base64
KNOWN_DIGEST = "SHA-256=BVwEg0ZY4j26A9OLJlyn9LcDGEQdpjquKXJabbx+FQY="
KNOWN_SIGNATURE = "9B0qsG3JQe59JvQz8hBy1kpdn+/SZbiZlYlKZlK1P1s="


def signed_request(body: bytes = BODY, *, clock: float = DATE_EPOCH) -> httpx.Request:
    request = httpx.Request(
        "POST", "https://apitest.cybersource.com/flex/v2/sessions", content=body
    )
    auth = HTTPSignatureAuth(
        "testrest", "key-1", decode_shared_secret(SECRET_B64), clock=lambda: clock
    )
    return next(auth.auth_flow(request))


def merchants() -> dict[str, MerchantKey]:
    return {"testrest": MerchantKey("testrest", "key-1", decode_shared_secret(SECRET_B64))}


def verify(request: httpx.Request, *, now: float = DATE_EPOCH, body: bytes | None = None):
    return verify_request(
        method=request.method,
        target=request.url.raw_path.decode(),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=request.content if body is None else body,
        merchants=merchants(),
        now=now,
    )


def test_known_answer_vector_matches_openssl() -> None:
    """The signer reproduces a Digest and signature computed independently with openssl."""
    request = signed_request()
    params = parse_signature_header(request.headers["signature"])
    assert (KNOWN_DIGEST, KNOWN_SIGNATURE) == (request.headers["digest"], params["signature"])


def test_signature_equals_hmac_computed_by_hand() -> None:
    """The signature is base64(HMAC-SHA256(b64decode(secret), signing string))."""
    request = signed_request()
    text = "\n".join(
        [
            "host: apitest.cybersource.com",
            f"date: {DATE}",
            "request-target: post /flex/v2/sessions",
            f"digest: SHA-256={base64.b64encode(hashlib.sha256(BODY).digest()).decode()}",
            "v-c-merchant-id: testrest",
        ]
    )
    mac = hmac.new(base64.b64decode(SECRET_B64), text.encode(), hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    assert expected == parse_signature_header(request.headers["signature"])["signature"]


def test_signature_header_lists_the_headers_in_order() -> None:
    """The Signature header names keyid, HmacSHA256 and the five signed headers, no parens."""
    params = parse_signature_header(signed_request().headers["signature"])
    expected = {
        "keyid": "key-1",
        "algorithm": "HmacSHA256",
        "headers": "host date request-target digest v-c-merchant-id",
    }
    assert expected == {k: params[k] for k in expected}


def test_request_carries_date_and_merchant_headers() -> None:
    """Date is IMF-fixdate GMT and v-c-merchant-id is set."""
    request = signed_request()
    assert (DATE, "testrest") == (request.headers["date"], request.headers["v-c-merchant-id"])


def test_get_requests_sign_without_digest() -> None:
    """A GET signs host, date, request-target and v-c-merchant-id, and sends no Digest."""
    request = httpx.Request("GET", "https://apitest.cybersource.com/flex/v2/public-keys/zu")
    auth = HTTPSignatureAuth("m", "k", decode_shared_secret(SECRET_B64), clock=lambda: 0)
    signed = next(auth.auth_flow(request))
    params = parse_signature_header(signed.headers["signature"])
    assert ("host date request-target v-c-merchant-id", None) == (
        params["headers"],
        signed.headers.get("digest"),
    )


def test_signing_string_has_no_trailing_newline() -> None:
    """name: value lines joined by newlines only."""
    assert "a: 1\nb: 2" == signing_string(["a", "b"], {"a": "1", "b": "2"})


def test_verifier_accepts_what_the_signer_signed() -> None:
    """The simulator's verifier accepts the client's signature."""
    assert "testrest" == verify(signed_request()).merchant_id


def test_verifier_rejects_a_changed_body() -> None:
    """The Digest covers the raw bytes: one changed byte fails."""
    with pytest.raises(AuthFailure, match="Digest"):
        verify(signed_request(), body=BODY.replace(b"number", b"numbex"))


@pytest.mark.parametrize("skew", [-301, 301])
def test_verifier_rejects_a_date_outside_five_minutes(skew: int) -> None:
    """A Date more than 5 minutes away from now fails."""
    with pytest.raises(AuthFailure, match="window"):
        verify(signed_request(), now=DATE_EPOCH + skew)


def test_verifier_accepts_a_date_inside_five_minutes() -> None:
    """A Date 299 s off still passes."""
    assert "testrest" == verify(signed_request(), now=DATE_EPOCH + 299).merchant_id


def test_verifier_rejects_a_wrong_secret() -> None:
    """A signature made with another secret fails."""
    request = httpx.Request("POST", "https://h/flex/v2/sessions", content=BODY)
    other = base64.b64encode(b"another-secret").decode()
    auth = HTTPSignatureAuth(
        "testrest", "key-1", decode_shared_secret(other), clock=lambda: DATE_EPOCH
    )
    with pytest.raises(AuthFailure, match="Authentication Failed"):
        verify(next(auth.auth_flow(request)))


def test_verifier_names_missing_headers() -> None:
    """Missing headers are listed the way the gateway lists them."""
    request = httpx.Request("POST", "https://h/flex/v2/sessions", content=BODY)
    with pytest.raises(
        AuthFailure, match="missing http required header : v-c-merchant-id,signature,date,"
    ):
        verify(request)


def test_verifier_rejects_parenthesised_request_target() -> None:
    """The retired (request-target) form is refused."""
    request = signed_request()
    request.headers["signature"] = request.headers["signature"].replace(
        "request-target", "(request-target)"
    )
    with pytest.raises(AuthFailure, match=r"\(request-target\)"):
        verify(request)


def test_verifier_rejects_a_signature_that_skips_the_digest() -> None:
    """A POST whose signature does not cover digest fails."""
    request = signed_request()
    request.headers["signature"] = request.headers["signature"].replace(" digest", "")
    with pytest.raises(AuthFailure, match="must cover digest"):
        verify(request)


@pytest.mark.parametrize("value", ["", "nope", 'keyid="a", broken', "!!!"])
def test_parse_signature_header_refuses_garbage(value: str) -> None:
    """Only k="v" pairs parse; an empty header has no required params."""
    if value == "":
        assert {} == parse_signature_header(value)
        return
    with pytest.raises(ValueError, match="malformed"):
        parse_signature_header(value)


@pytest.mark.parametrize("text", ["", "   ", "not base64!"])
def test_decode_shared_secret_refuses_bad_input(text: str) -> None:
    """An empty or non-base64 secret is a ValueError that does not echo it."""
    with pytest.raises(ValueError) as info:
        decode_shared_secret(text)
    assert text.strip() == "" or text not in str(info.value)


def test_body_digest_format() -> None:
    """Digest is SHA-256= and standard base64."""
    assert "SHA-256=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" == body_digest(b"")
