"""Each rejection, end to end: the client's precise error class and the simulator's answer.

Requests the client would refuse to build (a spoiled Digest, an unknown field, a payload
missing the number) are built by hand, and sent with plain httpx.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc import jwe as rfc_jwe
from joserfc import jws as rfc_jws
from joserfc.jwk import RSAKey

from relay.config import FlexConfig, FlexCredentials
from relay.dev.flexsim.app import FlexSimulator, build_app
from relay.dev.flexsim.auth import MerchantKey
from relay.errors import (
    CaptureContextExpired,
    CaptureContextInvalid,
    FlexAuthFailed,
    FlexRejected,
    InvalidFieldSpec,
    MissingRequiredField,
    TransientTokenInvalid,
)
from relay.flex.fields import CARD_NUMBER, CARD_SECURITY_CODE, FieldSpec
from relay.flex.models import CaptureContext
from relay.flex.signing import HTTPSignatureAuth
from relay.secrets import Secret
from tests.cards_testdata import TEST_CARDS, assert_no_test_pans
from tests.integration.conftest import (
    SESSIONS_PATH,
    FlexSim,
    MakeRig,
    Rig,
    assert_no_pan_in_error,
    expiry_year,
    hand_signed_headers,
    make_card,
    session_body,
    start_flexsim,
    token_claims,
    token_header,
)

VISA = TEST_CARDS[0].digits
BAD_LUHN = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
STALE = 600.0


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def envelope(response: httpx.Response) -> dict[str, Any]:
    """The responseStatus envelope of an error answer."""
    status = response.json()["responseStatus"]
    assert isinstance(status, dict)
    return status


def detail_locations(response: httpx.Response) -> list[str]:
    """The `location` of every detail in the envelope."""
    return [detail["location"] for detail in envelope(response).get("details", [])]


async def post_jwe(http: httpx.AsyncClient, ctx: CaptureContext, jwe: str) -> httpx.Response:
    """POST a compact JWE raw, as Microform does."""
    return await http.post(
        ctx.tokens_url,
        content=jwe.encode(),
        headers={"Content-Type": "application/jwt; charset=utf-8"},
    )


async def fresh_context(rig: Rig, fields=None) -> CaptureContext:
    """A new, verified capture context from the rig's simulator."""
    cc = await (rig.flex.create_session(fields) if fields else rig.flex.create_session())
    return await rig.flex.verify_capture_context(cc)


def joserfc_jwe(ctx: CaptureContext, data: dict[str, Any], *, index: int = 0) -> str:
    """A JWE of a hand-built payload, encrypted by joserfc to the context's one-time key."""
    plaintext = json.dumps({"data": data, "context": ctx.raw, "index": index}).encode()
    return rfc_jwe.encrypt_compact(
        {"alg": "RSA-OAEP", "enc": "A256GCM", "kid": ctx.one_time_kid},
        plaintext,
        RSAKey.import_key(dict(ctx.one_time_jwk)),
        algorithms=["RSA-OAEP", "A256GCM"],
    )


async def expect_rejected(rig: Rig, ctx: CaptureContext, jwe: str) -> FlexRejected:
    """post_token raises FlexRejected; return it after checking it names no PAN."""
    with pytest.raises(FlexRejected) as caught:
        await rig.flex.post_token(ctx, jwe)
    assert_no_pan_in_error(caught.value, BAD_LUHN)
    return caught.value


# HTTP Signature on /sessions.


async def test_wrong_secret_is_flex_auth_failed(flexsim: FlexSim, make_rig: MakeRig) -> None:
    """A session signed with the wrong secret raises FlexAuthFailed after one attempt."""
    rig = make_rig(
        config=flexsim.config(credentials=flexsim.credentials(shared_secret=Secret(b"x" * 32)))
    )
    with pytest.raises(FlexAuthFailed) as caught:
        await rig.flex.create_session()
    assert (401, "AUTHENTICATION_FAILED", 1) == (
        caught.value.http_status,
        caught.value.flex_reason,
        len(rig.sent),
    )
    assert_no_pan_in_error(caught.value)


async def test_wrong_secret_gets_the_gateway_401_body(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """The simulator answers a bad signature with 401 `{"response": {"rmsg": ...}}`."""
    auth = HTTPSignatureAuth(flexsim.merchant_id, flexsim.key_id, Secret(b"y" * 32))
    response = await http.post(flexsim.url + SESSIONS_PATH, content=session_body(), auth=auth)
    assert (401, {"response": {"rmsg": "Authentication Failed"}}) == (
        response.status_code,
        response.json(),
    )


@pytest.mark.parametrize("skew", [-STALE, STALE], ids=["slow_clock", "fast_clock"])
async def test_stale_date_is_flex_auth_failed(
    flexsim: FlexSim, make_rig: MakeRig, skew: float
) -> None:
    """A Date ten minutes off raises FlexAuthFailed."""
    rig = make_rig(flexsim, clock=lambda: time.time() + skew)
    with pytest.raises(FlexAuthFailed) as caught:
        await rig.flex.create_session()
    assert 401 == caught.value.http_status


async def test_stale_date_gets_401_naming_the_date(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """The simulator's 401 for a stale Date says it is the Date."""
    auth = HTTPSignatureAuth(
        flexsim.merchant_id,
        flexsim.key_id,
        Secret(flexsim.secret),
        clock=lambda: time.time() - STALE,
    )
    response = await http.post(flexsim.url + SESSIONS_PATH, content=session_body(), auth=auth)
    assert (401, {"response": {"rmsg": "Date header is outside the allowed window"}}) == (
        response.status_code,
        response.json(),
    )


async def test_date_four_minutes_off_is_accepted(flexsim: FlexSim, make_rig: MakeRig) -> None:
    """A Date inside the five-minute window still gets a capture context."""
    rig = make_rig(flexsim, clock=lambda: time.time() - 240)
    assert 3 == len((await rig.flex.create_session()).split("."))


async def test_wrong_digest_gets_401(flexsim: FlexSim, http: httpx.AsyncClient) -> None:
    """A Digest (correctly signed) of other bytes than the body sent gets 401."""
    body = session_body()
    headers = hand_signed_headers(
        flexsim,
        body,
        digest="SHA-256=" + base64.b64encode(hashlib.sha256(body + b" ").digest()).decode(),
    )
    response = await http.post(flexsim.url + SESSIONS_PATH, content=body, headers=headers)
    assert (401, {"response": {"rmsg": "Digest does not match the request body"}}) == (
        response.status_code,
        response.json(),
    )


@pytest.mark.parametrize("field", ["merchant_id", "key_id"])
async def test_unknown_merchant_or_key_id_is_flex_auth_failed(
    flexsim: FlexSim, make_rig: MakeRig, http: httpx.AsyncClient, field: str
) -> None:
    """An unknown merchant id or key id raises FlexAuthFailed, and the simulator answers 401."""
    credentials = flexsim.credentials(**{field: "nobody"})
    rig = make_rig(config=flexsim.config(credentials=credentials))
    with pytest.raises(FlexAuthFailed):
        await rig.flex.create_session()
    body = session_body()
    headers = hand_signed_headers(flexsim, body, **{field: "nobody"})
    response = await http.post(flexsim.url + SESSIONS_PATH, content=body, headers=headers)
    assert (401, {"response": {"rmsg": "Authentication Failed"}}) == (
        response.status_code,
        response.json(),
    )


async def test_parenthesised_request_target_gets_401(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """The retired `(request-target)` form, correctly signed, gets 401."""
    body = session_body()
    headers = hand_signed_headers(flexsim, body, target_label="(request-target)")
    response = await http.post(flexsim.url + SESSIONS_PATH, content=body, headers=headers)
    assert 401 == response.status_code
    assert "(request-target)" in response.json()["response"]["rmsg"]


# The field spec.


@pytest.mark.parametrize(
    ("fields_body", "location"),
    [
        (
            {"fields": {"paymentInformation": {"card": {"number": {}, "nickname": {}}}}},
            "paymentInformation.card.nickname",
        ),
        (
            {
                "fields": {"paymentInformation": {"card": {"number": {}}}},
                "targetOrigins": ["https://shop.test"],
            },
            "targetOrigins",
        ),
    ],
    ids=["unknown_leaf", "microform_member"],
)
async def test_unknown_field_in_session_request_is_400_with_its_location(
    flexsim: FlexSim, http: httpx.AsyncClient, fields_body: dict[str, Any], location: str
) -> None:
    """A correctly signed session request naming an unknown field gets 400 locating it."""
    body = json.dumps(fields_body).encode()
    response = await http.post(
        flexsim.url + SESSIONS_PATH, content=body, headers=hand_signed_headers(flexsim, body)
    )
    status = envelope(response)
    assert (400, 400, "INVALID_DATA", [location]) == (
        response.status_code,
        status["status"],
        status["reason"],
        detail_locations(response),
    )


async def test_client_refuses_an_unknown_field_before_sending(rig: Rig) -> None:
    """The client raises InvalidFieldSpec for an unknown field and sends nothing."""
    with pytest.raises(InvalidFieldSpec):
        await rig.flex.create_session(
            [FieldSpec(CARD_NUMBER), FieldSpec("paymentInformation.card.nickname")]
        )
    assert [] == rig.sent


# Capture-context verification.


@dataclasses.dataclass
class Genuine:
    """A genuine capture context, its claims, and the long-term public key that signed it."""

    cc: str
    ctx: CaptureContext
    claims: dict[str, Any]
    kid: str
    public_pem: bytes


@pytest.fixture
async def genuine(rig: Rig, flexsim: FlexSim, http: httpx.AsyncClient) -> Genuine:
    """A fresh, verified capture context from the shared simulator."""
    ctx = await fresh_context(rig)
    jwk = (await http.get(f"{flexsim.url}/flex/v2/public-keys/{ctx.kid}")).json()
    public = RSAKey.import_key({k: v for k, v in jwk.items() if k != "use"})
    pem = public.as_pem(private=False)
    return Genuine(ctx.raw, ctx, token_claims(ctx.raw), ctx.kid, pem)


@pytest.fixture(scope="module")
def attacker_key() -> RSAKey:
    """An RSA key the simulator never saw."""
    return RSAKey.generate_key(2048, private=True)


def attacker_headers(genuine: Genuine, attacker_key: RSAKey) -> dict[str, dict[str, Any]]:
    """JWS headers of contexts the attacker signs with its own RSA key."""
    public = {
        k: v for k, v in attacker_key.as_dict(private=False).items() if k in {"kty", "n", "e"}
    }
    return {
        "other_key_same_kid": {"alg": "RS256", "kid": genuine.kid},
        "unknown_kid": {"alg": "RS256", "kid": "unknownkid"},
        "jku_header": {"alg": "RS256", "kid": genuine.kid, "jku": "https://attacker.test/keys"},
        "jwk_header": {"alg": "RS256", "kid": genuine.kid, "jwk": public},
    }


def forge(genuine: Genuine, attacker_key: RSAKey, how: str) -> str:
    """A capture context forged in one of the classic ways, keeping the genuine claims."""
    claims = json.dumps(genuine.claims).encode()
    signed_by_attacker = attacker_headers(genuine, attacker_key)
    if how in signed_by_attacker:
        return rfc_jws.serialize_compact(signed_by_attacker[how], claims, attacker_key)
    if how == "alg_none":
        head = b64url(json.dumps({"alg": "none", "kid": genuine.kid}).encode())
        return f"{head}.{b64url(claims)}."
    if how == "hs256_with_public_key":
        head = b64url(json.dumps({"alg": "HS256", "kid": genuine.kid}).encode())
        signing_input = f"{head}.{b64url(claims)}"
        mac = hmac.new(genuine.public_pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"
    assert how == "claims_swapped_signature_kept"
    changed = genuine.claims | {"exp": genuine.claims["exp"] + 86_400}
    head, _, signature = genuine.cc.split(".")
    return f"{head}.{b64url(json.dumps(changed).encode())}.{signature}"


FORGERIES = [
    "other_key_same_kid",
    "unknown_kid",
    "jku_header",
    "jwk_header",
    "alg_none",
    "hs256_with_public_key",
    "claims_swapped_signature_kept",
]


@pytest.mark.parametrize("how", FORGERIES)
async def test_forged_capture_context_is_capture_context_invalid(
    rig: Rig, genuine: Genuine, attacker_key: RSAKey, flexsim: FlexSim, how: str
) -> None:
    """A forged CC raises CaptureContextInvalid, and no key is fetched from anywhere but Flex."""
    with pytest.raises(CaptureContextInvalid) as caught:
        await rig.flex.verify_capture_context(forge(genuine, attacker_key, how))
    assert type(caught.value) is CaptureContextInvalid
    assert [] == [str(r.url) for r in rig.sent if not str(r.url).startswith(flexsim.url + "/")]


@pytest.mark.parametrize("how", FORGERIES)
async def test_forged_capture_context_inside_a_jwe_is_rejected_by_tokens(
    rig: Rig, genuine: Genuine, attacker_key: RSAKey, http: httpx.AsyncClient, how: str
) -> None:
    """A JWE under the real one-time key carrying a forged CC gets 400 CAPTURE_CONTEXT_INVALID."""
    forged = dataclasses.replace(genuine.ctx, raw=forge(genuine, attacker_key, how))
    jwe = rig.flex.encrypt_card(forged, make_card(VISA))
    error = await expect_rejected(rig, genuine.ctx, jwe)
    response = await post_jwe(http, genuine.ctx, rig.flex.encrypt_card(forged, make_card(VISA)))
    assert (400, "CAPTURE_CONTEXT_INVALID", 400, ["context"]) == (
        error.http_status,
        error.flex_reason,
        response.status_code,
        detail_locations(response),
    )


async def test_unknown_kid_fetches_once_then_is_negatively_cached(
    rig: Rig, genuine: Genuine, attacker_key: RSAKey
) -> None:
    """Two CCs naming an unknown kid cost Flex one public-key request."""
    forged = forge(genuine, attacker_key, "unknown_kid")
    for _ in range(2):
        with pytest.raises(CaptureContextInvalid):
            await rig.flex.verify_capture_context(forged)
    assert 1 == len(rig.sent_to("/flex/v2/public-keys/unknownkid"))


async def test_context_for_another_origin_is_capture_context_invalid(make_rig: MakeRig) -> None:
    """A genuinely signed CC whose origin is not the configured Flex host is refused."""
    secret = Secret(b"origin-test-secret")
    sim = FlexSimulator([MerchantKey("m", "k", secret)], origin="https://evil.test", pool_size=2)
    config = FlexConfig(
        base_url="http://flexsim.test", credentials=FlexCredentials("m", "k", secret)
    )
    async with sim.running():
        rig = make_rig(
            config=config, http=httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(sim)))
        )
        cc = await rig.flex.create_session()
        with pytest.raises(CaptureContextInvalid) as caught:
            await rig.flex.verify_capture_context(cc)
    assert ("https://evil.test", "capture context origin is not allowed") == (
        token_claims(cc)["flx"]["origin"],
        caught.value.message,
    )


# Expiry.


@pytest.fixture(scope="module")
def short_lived() -> Iterator[FlexSim]:
    """A simulator whose capture contexts live two seconds."""
    sim = start_flexsim("--context-ttl", "2")
    yield sim
    sim.finish()


async def test_expired_context_is_caught_by_client_and_simulator(
    short_lived: FlexSim, make_rig: MakeRig, http: httpx.AsyncClient
) -> None:
    """Past exp, verify raises CaptureContextExpired and /tokens answers CAPTURE_CONTEXT_EXPIRED."""
    rig = make_rig(short_lived)
    cc = await rig.flex.create_session()
    ctx = await rig.flex.verify_capture_context(cc)
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA))
    second_jwe = rig.flex.encrypt_card(ctx, make_card(VISA))
    assert 2 == ctx.expires_at - ctx.issued_at
    await asyncio.sleep(max(0.0, ctx.expires_at - time.time()) + 0.2)
    with pytest.raises(CaptureContextExpired):
        await rig.flex.verify_capture_context(cc)
    error = await expect_rejected(rig, ctx, jwe)
    response = await post_jwe(http, ctx, second_jwe)
    assert (400, "CAPTURE_CONTEXT_EXPIRED", 400, "CAPTURE_CONTEXT_EXPIRED") == (
        error.http_status,
        error.flex_reason,
        response.status_code,
        envelope(response)["reason"],
    )


# The JWE and its payload.


async def test_jwe_under_one_key_with_another_context_is_invalid(
    rig: Rig, http: httpx.AsyncClient
) -> None:
    """A JWE encrypted to CC A's one-time key but carrying CC B gets CAPTURE_CONTEXT_INVALID."""
    ctx_a, ctx_b = await fresh_context(rig), await fresh_context(rig)
    mixed = dataclasses.replace(
        ctx_b, one_time_kid=ctx_a.one_time_kid, one_time_jwk=ctx_a.one_time_jwk
    )
    assert (ctx_a.one_time_kid, ctx_b.raw) == (
        token_header(rig.flex.encrypt_card(mixed, make_card(VISA)))["kid"],
        mixed.raw,
    )
    error = await expect_rejected(rig, ctx_a, rig.flex.encrypt_card(mixed, make_card(VISA)))
    response = await post_jwe(http, ctx_a, rig.flex.encrypt_card(mixed, make_card(VISA)))
    assert (400, "CAPTURE_CONTEXT_INVALID", 400, "CAPTURE_CONTEXT_INVALID") == (
        error.http_status,
        error.flex_reason,
        response.status_code,
        envelope(response)["reason"],
    )


def tamper(jwe: str) -> str:
    """Flip one character in the middle of the JWE ciphertext."""
    parts = jwe.split(".")
    middle = len(parts[3]) // 2
    flipped = "B" if parts[3][middle] == "A" else "A"
    parts[3] = parts[3][:middle] + flipped + parts[3][middle + 1 :]
    return ".".join(parts)


async def test_tampered_jwe_is_invalid_data(rig: Rig, http: httpx.AsyncClient) -> None:
    """A JWE whose ciphertext was altered fails decryption: 400 INVALID_DATA."""
    ctx = await fresh_context(rig)
    error = await expect_rejected(rig, ctx, tamper(rig.flex.encrypt_card(ctx, make_card(VISA))))
    response = await post_jwe(http, ctx, tamper(rig.flex.encrypt_card(ctx, make_card(VISA))))
    assert (400, "INVALID_DATA", 400, "INVALID_DATA") == (
        error.http_status,
        error.flex_reason,
        response.status_code,
        envelope(response)["reason"],
    )
    assert_no_test_pans(response.text, "tokens error body")


async def test_missing_required_field_is_refused_before_sending(rig: Rig) -> None:
    """A CC requiring securityCode and a card without one: MissingRequiredField, nothing sent."""
    ctx = await fresh_context(rig, fields=[FieldSpec(CARD_NUMBER), FieldSpec(CARD_SECURITY_CODE)])
    sent_before = len(rig.sent)
    with pytest.raises(MissingRequiredField) as caught:
        rig.flex.encrypt_card(ctx, make_card(VISA, code=None))
    assert ({"field": CARD_SECURITY_CODE, "jti": ctx.jti}, sent_before) == (
        caught.value.ids,
        len(rig.sent),
    )
    assert [] == rig.sent_to("/flex/v2/tokens")
    assert_no_pan_in_error(caught.value)


async def test_payload_missing_the_number_is_missing_field(
    rig: Rig, http: httpx.AsyncClient
) -> None:
    """A hand-built payload without the card number gets 400 MISSING_FIELD locating it."""
    ctx = await fresh_context(rig)
    data = {"paymentInformation": {"card": {"expirationMonth": "12"}}}
    error = await expect_rejected(rig, ctx, joserfc_jwe(ctx, data))
    response = await post_jwe(http, ctx, joserfc_jwe(ctx, data))
    assert ("MISSING_FIELD", 400, "MISSING_FIELD", [CARD_NUMBER]) == (
        error.flex_reason,
        response.status_code,
        envelope(response)["reason"],
        detail_locations(response),
    )


async def test_bad_luhn_is_invalid_data_at_the_number(rig: Rig, http: httpx.AsyncClient) -> None:
    """A Luhn-invalid number gets 400 INVALID_DATA at paymentInformation.card.number, unechoed."""
    ctx = await fresh_context(rig)
    data = {
        "paymentInformation": {
            "card": {
                "number": BAD_LUHN,
                "expirationMonth": "12",
                "expirationYear": str(expiry_year()),
            }
        }
    }
    error = await expect_rejected(rig, ctx, joserfc_jwe(ctx, data))
    response = await post_jwe(http, ctx, joserfc_jwe(ctx, data))
    assert ("INVALID_DATA", 400, "INVALID_DATA", [CARD_NUMBER]) == (
        error.flex_reason,
        response.status_code,
        envelope(response)["reason"],
        detail_locations(response),
    )
    assert (False, False) == (BAD_LUHN in response.text, BAD_LUHN[-10:] in response.text)


@pytest.mark.parametrize("index", [1, -1])
async def test_index_other_than_zero_is_400(rig: Rig, http: httpx.AsyncClient, index: int) -> None:
    """A payload whose index is not 0 gets 400 INVALID_DATA at index."""
    ctx = await fresh_context(rig)
    data = {"paymentInformation": {"card": {"number": VISA}}}
    error = await expect_rejected(rig, ctx, joserfc_jwe(ctx, data, index=index))
    response = await post_jwe(http, ctx, joserfc_jwe(ctx, data, index=index))
    assert ("INVALID_DATA", 400, ["index"]) == (
        error.flex_reason,
        response.status_code,
        detail_locations(response),
    )


async def test_json_form_without_key_id_is_400_at_key_id(rig: Rig, http: httpx.AsyncClient) -> None:
    """A JSON tokens request without a keyId string gets 400 INVALID_DATA at keyId."""
    ctx = await fresh_context(rig)
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA))
    response = await http.post(
        ctx.tokens_url,
        content=json.dumps({"jwe": jwe}).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert (400, "INVALID_DATA", ["keyId"]) == (
        response.status_code,
        envelope(response)["reason"],
        detail_locations(response),
    )


async def test_token_checked_against_another_context_is_transient_token_invalid(
    rig: Rig,
) -> None:
    """A genuine TT verified against a different CC than its own raises TransientTokenInvalid."""
    ctx_a, ctx_b = await fresh_context(rig), await fresh_context(rig)
    tt = await rig.flex.post_token(ctx_a, rig.flex.encrypt_card(ctx_a, make_card(VISA)))
    assert "411111" == rig.flex.verify_transient_token(tt, ctx_a).bin
    with pytest.raises(TransientTokenInvalid):
        rig.flex.verify_transient_token(tt, ctx_b)
    # The same kid but the wrong key: the signature itself must fail.
    impostor = dataclasses.replace(ctx_b, one_time_kid=ctx_a.one_time_kid)
    with pytest.raises(TransientTokenInvalid) as caught:
        rig.flex.verify_transient_token(tt, impostor)
    assert "transient token signature does not verify" == caught.value.message


def spoiled_payloads(digits: str) -> list[dict[str, Any]]:
    """Payloads carrying a valid test PAN, each refused for another reason."""
    year = str(expiry_year())
    return [
        {"paymentInformation": {"card": {"number": digits, "expirationMonth": "13"}}},
        {"paymentInformation": {"card": {"number": digits, "securityCode": "12a"}}},
        {"paymentInformation": {"card": {"number": digits, "expirationYear": "1999"}}},
        {"paymentInformation": {"card": {"number": digits, "type": "visa"}}},
        {"paymentInformation.card.number": digits, "orderInformation.billTo.email": "a@b.test"},
        {"paymentInformation": {"card": {"number": int(digits), "expirationYear": year[:1]}}},
    ]


async def test_no_rejection_text_names_the_card(rig: Rig, http: httpx.AsyncClient) -> None:
    """Rejections of payloads carrying each test PAN name none of them, in errors or bodies."""
    ctx = await fresh_context(rig)
    texts, locations = [], set()
    for position, vector in enumerate(TEST_CARDS):
        payloads = spoiled_payloads(vector.digits)
        data = payloads[position % len(payloads)]
        error = await expect_rejected(rig, ctx, joserfc_jwe(ctx, data))
        response = await post_jwe(http, ctx, joserfc_jwe(ctx, data))
        texts.extend([str(error), repr(error), response.text])
        locations.update(detail_locations(response))
    assert_no_test_pans("\n\n\n".join(texts), "rejection texts")
    assert {
        "paymentInformation.card.expirationMonth",
        "paymentInformation.card.securityCode",
        "paymentInformation.card.expirationYear",
        "paymentInformation.card.type",
        "orderInformation.billTo.email",
    } == locations
