"""The whole Flex v2 flow against a live simulator: session, CC, JWE, tokens, TT.

Also the two "done when" proofs with no relay code on the wire: a session signed by hand, and
a JWE built by joserfc (an independent JOSE library) that gets a verifiable transient token.
Key rotation uses the simulator in process, since rotating is not exposed over HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from joserfc import jwe as rfc_jwe
from joserfc import jws as rfc_jws
from joserfc.jwk import RSAKey

from relay.cards import AMEX, DINERS, DISCOVER, JCB, MASTERCARD, VISA
from relay.config import FlexConfig, FlexCredentials
from relay.dev.flexsim.app import FlexSimulator, build_app
from relay.dev.flexsim.auth import MerchantKey
from relay.dev.flexsim.keys import SigningKey, new_rsa_key
from relay.errors import CaptureContextInvalid
from relay.flex import jose
from relay.flex.client import FlexClient
from relay.flex.fields import (
    CARD_EXPIRATION_MONTH,
    CARD_EXPIRATION_YEAR,
    CARD_NUMBER,
    CARD_SECURITY_CODE,
    CARD_TYPE,
    FieldSpec,
)
from relay.flex.keys import PublicKeyStore
from relay.secrets import Secret
from tests.cards_testdata import TEST_CARDS, CardVector
from tests.integration.conftest import (
    CONTEXT_TTL,
    SESSIONS_PATH,
    TOKENS_PATH,
    FlexSim,
    MakeRig,
    Rig,
    expiry_year,
    hand_signed_headers,
    hand_signed_session,
    make_card,
    session_body,
    sha256_digest,
    token_claims,
    token_header,
)

BILL_TO_POSTAL_CODE = "orderInformation.billTo.postalCode"
FIELDS = (
    FieldSpec(CARD_NUMBER),
    FieldSpec(CARD_SECURITY_CODE),
    FieldSpec(CARD_EXPIRATION_MONTH),
    FieldSpec(CARD_EXPIRATION_YEAR),
    FieldSpec(CARD_TYPE, required=False),
    FieldSpec(BILL_TO_POSTAL_CODE, required=False),
)
NETWORKS = {VISA, MASTERCARD, AMEX, DISCOVER, JCB, DINERS}
CARDS = [next(c for c in TEST_CARDS if c.card_type == code) for code in sorted(NETWORKS)]
COMPACT_JWS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
ALNUM = re.compile(r"^[A-Za-z0-9]+$")
VISA_CARD = TEST_CARDS[0]


def code_for(vector: CardVector) -> str:
    """A security code of the length the network uses."""
    return "1234" if vector.card_type == AMEX else "123"


async def full_flow(rig: Rig, vector: CardVector, fields=FIELDS):
    """Session, CC verification, JWE, tokens and TT verification with the relay client."""
    cc = await rig.flex.create_session(fields)
    ctx = await rig.flex.verify_capture_context(cc)
    jwe = rig.flex.encrypt_card(ctx, make_card(vector.digits, code_for(vector)))
    tt = await rig.flex.post_token(ctx, jwe)
    return ctx, tt, rig.flex.verify_transient_token(tt, ctx)


@pytest.mark.parametrize("vector", CARDS, ids=lambda v: v.network)
async def test_flow_gives_a_verified_token_with_masked_card_facts(rig: Rig, vector) -> None:
    """Each network's card goes through the whole flow into a TT with masked PAN, BIN and type."""
    ctx, _, token = await full_flow(rig, vector)
    digits = vector.digits
    expected = ("X" * (len(digits) - 4) + digits[-4:], digits[:6], vector.card_type)
    assert expected == (token.masked_pan, token.bin, token.card_type)
    assert (ctx.one_time_kid, f"Flex/{ctx.one_time_kid[:2]}") == (token.kid, token.issuer)


async def test_capture_context_claims_match_the_wire_notes(rig: Rig, flexsim: FlexSim) -> None:
    """The CC names the tokens path, the simulator's origin, api-0.1.0, its TTL and the fields."""
    cc = await rig.flex.create_session(FIELDS)
    ctx = await rig.flex.verify_capture_context(cc)
    claims = token_claims(cc)
    flx = claims["flx"]
    assert ("Flex API", TOKENS_PATH, flexsim.url) == (claims["iss"], flx["path"], flx["origin"])
    assert ("api-0.1.0", CONTEXT_TTL) == (ctx.context_type, ctx.expires_at - ctx.issued_at)
    assert {"kid": flexsim.kid, "alg": "RS256"} == token_header(cc)
    assert {CARD_NUMBER, CARD_SECURITY_CODE, CARD_EXPIRATION_MONTH, CARD_EXPIRATION_YEAR} == set(
        claims["ctx"][0]["data"]["requiredFields"]
    )
    assert {CARD_TYPE, BILL_TO_POSTAL_CODE} == set(claims["ctx"][0]["data"]["optionalFields"])
    assert {"kty", "e", "use", "n", "kid"} == set(flx["jwk"])
    assert ("RSA", "enc", 32) == (flx["jwk"]["kty"], flx["jwk"]["use"], len(ctx.one_time_kid))
    assert (16, True) == (len(ctx.jti), bool(ALNUM.match(ctx.jti)))


async def test_transient_token_claims_match_the_wire_notes(rig: Rig) -> None:
    """The TT is signed by the one-time kid, lives 900 s, and carries a 64-character jti."""
    ctx, tt, token = await full_flow(rig, VISA_CARD)
    claims = token_claims(tt)
    assert {"kid": ctx.one_time_kid, "alg": "RS256"} == token_header(tt)
    assert (f"Flex/{ctx.one_time_kid[:2]}", "api-0.1.0", 900) == (
        claims["iss"],
        claims["type"],
        claims["exp"] - claims["iat"],
    )
    assert (64, True, token.jti) == (
        len(claims["jti"]),
        bool(ALNUM.match(claims["jti"])),
        claims["jti"],
    )
    card = claims["content"]["paymentInformation"]["card"]
    expected = {
        "number": {"maskedValue": "XXXXXXXXXXXX1111", "bin": "411111"},
        "type": {"value": VISA},
        "expirationMonth": {"value": "12"},
        "expirationYear": {"value": str(expiry_year())},
        "securityCode": {},
    }
    assert expected == card


async def test_detected_card_type_when_type_is_not_requested(rig: Rig) -> None:
    """Without a type field the TT reports the detected type, and the client reads it from there."""
    vector = next(c for c in TEST_CARDS if c.card_type == MASTERCARD)
    _, tt, token = await full_flow(rig, vector, fields=(FieldSpec(CARD_NUMBER),))
    number = token_claims(tt)["content"]["paymentInformation"]["card"]["number"]
    assert ([MASTERCARD], MASTERCARD) == (number["detectedCardTypes"], token.card_type)


async def test_json_key_id_request_form_is_accepted(rig: Rig, http: httpx.AsyncClient) -> None:
    """The iOS SDK's `{"keyId": jwe}` JSON form gets a TT that verifies like the raw form's."""
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA_CARD.digits))
    response = await http.post(
        ctx.tokens_url,
        content=json.dumps({"keyId": jwe}).encode(),
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json; charset=utf-8",
        },
    )
    assert 200 == response.status_code, response.text
    token = rig.flex.verify_transient_token(response.text, ctx)
    assert ("XXXXXXXXXXXX1111", VISA) == (token.masked_pan, token.card_type)


async def test_rsa_oaep_256_jwe_is_accepted(rig: Rig) -> None:
    """A JWE wrapped with RSA-OAEP-256 instead of RSA-OAEP also gets a verifiable TT."""
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = jose.encrypt_card_jwe(make_card(VISA_CARD.digits), ctx, alg="RSA-OAEP-256")
    assert ("RSA-OAEP-256", "A256GCM", ctx.one_time_kid) == tuple(
        token_header(jwe)[name] for name in ("alg", "enc", "kid")
    )
    token = rig.flex.verify_transient_token(await rig.flex.post_token(ctx, jwe), ctx)
    assert "411111" == token.bin


async def test_default_jwe_header_is_rsa_oaep_a256gcm(rig: Rig) -> None:
    """The client's JWE header is exactly what the docs example decodes to."""
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA_CARD.digits))
    assert {"kid": ctx.one_time_kid, "enc": "A256GCM", "alg": "RSA-OAEP"} == token_header(jwe)
    assert 5 == len(jwe.split("."))


async def test_tokens_digest_header_is_sha256_of_the_body(
    rig: Rig, http: httpx.AsyncClient
) -> None:
    """The tokens response carries `Digest: SHA-256=` of exactly its body bytes."""
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    jwe = rig.flex.encrypt_card(ctx, make_card(VISA_CARD.digits))
    response = await http.post(
        ctx.tokens_url,
        content=jwe.encode(),
        headers={"Content-Type": "application/jwt; charset=utf-8"},
    )
    assert (200, sha256_digest(response.content)) == (
        response.status_code,
        response.headers.get("digest"),
    )


async def test_hand_signed_session_request_gets_a_capture_context(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """A sessions call signed by hand (hashlib, hmac, base64) is answered 201 with a raw JWT."""
    body = session_body()
    response = await http.post(
        flexsim.url + SESSIONS_PATH, content=body, headers=hand_signed_headers(flexsim, body)
    )
    assert (201, "application/jwt", True) == (
        response.status_code,
        response.headers["content-type"].split(";")[0],
        bool(COMPACT_JWS.match(response.text)),
    )
    data = token_claims(response.text)["ctx"][0]["data"]
    assert ([CARD_NUMBER], [CARD_EXPIRATION_MONTH]) == (
        data["requiredFields"],
        data["optionalFields"],
    )


def without_use(jwk: dict[str, str]) -> RSAKey:
    """A public RSAKey from a Flex JWK minus `use`: joserfc will not verify with use=enc."""
    return RSAKey.import_key({name: value for name, value in jwk.items() if name != "use"})


async def test_jwe_built_by_joserfc_gets_a_verifiable_transient_token(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """A hand-signed session and a joserfc JWE with dotted keys get a TT joserfc verifies."""
    cc = await hand_signed_session(http, flexsim)
    public_key = (
        await http.get(f"{flexsim.url}/flex/v2/public-keys/{token_header(cc)['kid']}")
    ).json()
    claims = rfc_jws.deserialize_compact(cc, without_use(public_key), algorithms=["RS256"])
    one_time = json.loads(claims.payload)["flx"]["jwk"]
    plaintext = {
        "data": {
            "paymentInformation.card.number": VISA_CARD.digits,
            "paymentInformation.card.expirationMonth": "12",
        },
        "context": cc,
        "index": 0,
    }
    jwe = rfc_jwe.encrypt_compact(
        {"alg": "RSA-OAEP", "enc": "A256GCM", "kid": one_time["kid"]},
        json.dumps(plaintext).encode(),
        RSAKey.import_key(one_time),
        algorithms=["RSA-OAEP", "A256GCM"],
    )
    response = await http.post(
        flexsim.url + TOKENS_PATH,
        content=jwe.encode(),
        headers={"Content-Type": "application/jwt; charset=utf-8"},
    )
    assert 200 == response.status_code, response.text
    token = rfc_jws.deserialize_compact(response.text, without_use(one_time), algorithms=["RS256"])
    tt_claims = json.loads(token.payload)
    assert (one_time["kid"], f"Flex/{one_time['kid'][:2]}") == (
        token.headers()["kid"],
        tt_claims["iss"],
    )
    assert {
        "number": {
            "maskedValue": "XXXXXXXXXXXX1111",
            "bin": "411111",
            "detectedCardTypes": [VISA],
        },
        "expirationMonth": {"value": "12"},
    } == tt_claims["content"]["paymentInformation"]["card"]


async def test_public_key_is_a_bare_jwk_for_the_context_kid(
    flex_client: FlexClient, flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """/public-keys/{kid} answers the bare JWK (kty, use enc, kid, n, e) of the CC's signer."""
    cc = await flex_client.create_session()
    kid = token_header(cc)["kid"]
    response = await http.get(f"{flexsim.url}/flex/v2/public-keys/{kid}")
    key = response.json()
    assert (200, {"kty", "use", "kid", "n", "e"}) == (response.status_code, set(key))
    assert ("RSA", "enc", kid, "AQAB") == (key["kty"], key["use"], key["kid"], key["e"])
    assert kid == (await flex_client.verify_capture_context(cc)).kid


async def test_public_key_for_an_unknown_kid_is_404_with_an_envelope(
    flexsim: FlexSim, http: httpx.AsyncClient
) -> None:
    """An unknown kid gets 404 and the responseStatus envelope, never a key."""
    response = await http.get(f"{flexsim.url}/flex/v2/public-keys/unknownkid")
    status = response.json()["responseStatus"]
    assert (404, 404, "NOT_FOUND") == (response.status_code, status["status"], status["reason"])
    assert {"status", "reason", "message", "correlationId"} <= set(status)


# Key rotation, with the simulator in process so that a test can rotate its long-term key.

IN_PROCESS_URL = "http://flexsim.test"


@dataclasses.dataclass
class InProcess:
    """An in-process simulator behind httpx.ASGITransport."""

    sim: FlexSimulator
    transport: httpx.ASGITransport

    def config(self) -> FlexConfig:
        """Credentials the in-process simulator accepts."""
        return FlexConfig(
            base_url=IN_PROCESS_URL,
            credentials=FlexCredentials("rotation_merchant", "rotation_key", Secret(b"rot-secret")),
        )

    def rig(self, make_rig: MakeRig) -> Rig:
        """A recorded client whose requests go straight into the ASGI app."""
        return make_rig(config=self.config(), http=httpx.AsyncClient(transport=self.transport))


@pytest.fixture
async def in_process() -> AsyncIterator[InProcess]:
    """A FlexSimulator served through ASGITransport, its key pool running."""
    sim = FlexSimulator(
        [MerchantKey("rotation_merchant", "rotation_key", Secret(b"rot-secret"))], pool_size=4
    )
    async with sim.running():
        yield InProcess(sim, httpx.ASGITransport(app=build_app(sim)))


async def test_context_signed_before_rotation_still_verifies(
    in_process: InProcess, make_rig: MakeRig
) -> None:
    """After a rotation the old kid is still served, and a fresh client verifies an old CC."""
    before = in_process.rig(make_rig)
    old_cc = await before.flex.create_session()
    old_kid = in_process.sim.long_term.current.kid
    new_kid = in_process.sim.long_term.rotate().kid
    after = in_process.rig(make_rig)
    ctx = await after.flex.verify_capture_context(old_cc)
    token = after.flex.verify_transient_token(
        await after.flex.post_token(ctx, after.flex.encrypt_card(ctx, make_card(VISA_CARD.digits))),
        ctx,
    )
    assert (old_kid, [f"/flex/v2/public-keys/{old_kid}"]) == (
        ctx.kid,
        [r.url.path for r in after.sent_to("/flex/v2/public-keys/")],
    )
    assert ("411111", True) == (token.bin, new_kid != old_kid)


async def test_context_after_rotation_carries_the_new_kid(
    in_process: InProcess, make_rig: MakeRig
) -> None:
    """A session created after a rotation is signed by the new key and verifies under its kid."""
    rig = in_process.rig(make_rig)
    old_kid = (await rig.flex.verify_capture_context(await rig.flex.create_session())).kid
    new_kid = in_process.sim.long_term.rotate().kid
    ctx = await rig.flex.verify_capture_context(await rig.flex.create_session())
    assert (new_kid, True) == (ctx.kid, new_kid != old_kid)
    assert [old_kid, new_kid] == [
        r.url.path.rsplit("/", 1)[1] for r in rig.sent_to("/flex/v2/public-keys/")
    ]


async def test_key_store_refetches_when_a_cached_key_fails(
    in_process: InProcess, make_rig: MakeRig
) -> None:
    """A cached key that no longer verifies is refetched once its refresh window has passed."""
    rig = in_process.rig(make_rig)
    now = [1000.0]
    rig.flex.keys = PublicKeyStore(rig.flex.fetch_public_key, clock=lambda: now[0])
    kid = (await rig.flex.verify_capture_context(await rig.flex.create_session())).kid
    # The same kid now names another key, as after a rotation that reused it.
    in_process.sim.long_term.current = SigningKey(kid, new_rsa_key())
    cc = await rig.flex.create_session()
    with pytest.raises(CaptureContextInvalid):
        await rig.flex.verify_capture_context(cc)  # inside the refresh window: no refetch
    fetches_in_window = len(rig.sent_to("/flex/v2/public-keys/"))
    now[0] += 61
    ctx = await rig.flex.verify_capture_context(cc)
    assert (1, 2, kid) == (fetches_in_window, len(rig.sent_to("/flex/v2/public-keys/")), ctx.kid)
