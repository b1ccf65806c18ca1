"""The JOSE recipes: capture-context rules, the card JWE, and transient-token checks."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.cards import CardData, Pan, SecurityCode
from relay.dev.flexsim import jwt
from relay.errors import (
    CaptureContextExpired,
    CaptureContextInvalid,
    MissingRequiredField,
    TokenExpired,
    TransientTokenInvalid,
)
from relay.flex import fields, jose
from tests import fakes

ORIGINS = frozenset({fakes.ORIGIN})
VISA = "4111111111111111"


@pytest.fixture(scope="module")
def keys() -> fakes.FlexKeys:
    return fakes.FlexKeys.generate()


def verify(keys: fakes.FlexKeys, token: str, *, now: float = fakes.NOW + 1):
    return jose.verify_capture_context(
        token, keys.long_term_jwk(), now=now, allowed_origins=ORIGINS
    )


def card(*, code: str | None = "123") -> CardData:
    return CardData(Pan(VISA), 12, 2031, SecurityCode(code) if code else None)


def test_valid_context_becomes_typed(keys) -> None:
    """A well-formed context verifies into a CaptureContext with its claims."""
    ctx = verify(keys, fakes.sign_context(keys, fakes.context_claims(keys)))
    expected = (
        "zu",
        "rOAksGcp8Bgg6WLj",
        "https://flex.test/flex/v2/tokens",
        keys.one_time_kid,
        (fields.CARD_NUMBER,),
    )
    assert expected == (ctx.kid, ctx.jti, ctx.tokens_url, ctx.one_time_kid, ctx.required_fields)


def test_docs_claims_shape_with_unknown_extra_claims_is_accepted(keys) -> None:
    """Extra claims are tolerated: the docs say the JWT may grow."""
    claims = fakes.context_claims(keys) | {"extra": {"new": True}}
    assert "rOAksGcp8Bgg6WLj" == verify(keys, fakes.sign_context(keys, claims)).jti


def test_context_signed_by_another_key_is_rejected(keys) -> None:
    """A context re-signed by an unknown key with the same kid fails."""
    other = fakes.FlexKeys.generate()
    forged = jwt.sign_rs256(fakes.context_claims(keys), other.long_term, keys.kid)
    with pytest.raises(CaptureContextInvalid, match="signature"):
        verify(keys, forged)


def test_alg_none_is_rejected(keys) -> None:
    """An unsigned context (alg none) fails before any key is used."""
    forged = fakes.compact({"kid": "zu", "alg": "none"}, fakes.context_claims(keys))
    with pytest.raises(CaptureContextInvalid, match="RS256"):
        verify(keys, forged)


def test_hs256_with_the_public_key_is_rejected(keys) -> None:
    """The HS256 algorithm-confusion forgery fails."""
    with pytest.raises(CaptureContextInvalid, match="RS256"):
        verify(keys, fakes.hs256_with_public_key(keys, fakes.context_claims(keys)))


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
def test_key_location_headers_are_refused(keys, header: str) -> None:
    """A header pointing at a key elsewhere is refused, never followed."""
    claims = fakes.context_claims(keys)
    signed = fakes.sign_context(keys, claims)
    forged = fakes.compact(
        {"kid": "zu", "alg": "RS256", header: "https://evil.test/k"}, claims, b"sig"
    )
    assert "rOAksGcp8Bgg6WLj" == verify(keys, signed).jti
    with pytest.raises(CaptureContextInvalid, match="key location"):
        verify(keys, forged)


def test_expired_context_is_rejected(keys) -> None:
    """A context past its exp raises CaptureContextExpired."""
    token = fakes.sign_context(keys, fakes.context_claims(keys))
    with pytest.raises(CaptureContextExpired):
        verify(keys, token, now=fakes.NOW + 900)


def test_context_from_the_future_is_rejected(keys) -> None:
    """A context issued more than the leeway ahead of now fails."""
    token = fakes.sign_context(keys, fakes.context_claims(keys, now=fakes.NOW + 120))
    with pytest.raises(CaptureContextInvalid, match="future"):
        verify(keys, token)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("iss",), "Flex APl", "issuer"),
        (("flx", "path"), "/flex/v2/tokens/../admin", "path"),
        (("flx", "origin"), "https://evil.test", "origin is not allowed"),
        (("flx", "origin"), "ftp://flex.test", "origin"),
        (("flx", "jwk", "use"), "sig", "use=enc"),
        (("ctx",), [], "ctx"),
        (("jti",), 7, "jti"),
        (("exp",), "soon", "exp"),
    ],
)
def test_each_claim_rule_is_enforced(keys, path, value, message) -> None:
    """Each claim rule of DESIGN.md rejects a context that breaks it."""
    claims = fakes.context_claims(keys)
    node = claims
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(CaptureContextInvalid, match=message):
        verify(keys, fakes.sign_context(keys, claims))


def test_context_must_require_the_card_number(keys) -> None:
    """A context that does not require the number is refused."""
    claims = fakes.context_claims(keys, required=(fields.CARD_TYPE,))
    with pytest.raises(CaptureContextInvalid, match="card number"):
        verify(keys, fakes.sign_context(keys, claims))


def test_weak_one_time_key_is_rejected(keys) -> None:
    """A one-time key shorter than 2048 bits is refused."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    claims = fakes.context_claims(keys)
    claims["flx"]["jwk"] = jwt.public_jwk(weak.public_key(), "weak")
    with pytest.raises(CaptureContextInvalid, match="one-time key"):
        verify(keys, fakes.sign_context(keys, claims))


def test_oversized_context_is_rejected(keys) -> None:
    """A context above 16 KiB is refused before parsing."""
    claims = fakes.context_claims(keys) | {"pad": "x" * 20_000}
    with pytest.raises(CaptureContextInvalid, match="oversized"):
        verify(keys, fakes.sign_context(keys, claims))


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "!!.??.x", "e30.e30.e30"])
def test_garbage_is_rejected(keys, token: str) -> None:
    """Anything that is not a compact RS256 JWS fails with CaptureContextInvalid."""
    with pytest.raises(CaptureContextInvalid):
        verify(keys, token)


def test_jwe_holds_exactly_the_requested_fields(keys) -> None:
    """The payload carries required plus available optional fields, the raw context and index 0."""
    raw = fakes.sign_context(
        keys,
        fakes.context_claims(
            keys, optional=(fields.CARD_EXPIRATION_MONTH, fields.CARD_EXPIRATION_YEAR)
        ),
    )
    ctx = verify(keys, raw)
    token = jose.encrypt_card_jwe(card(), ctx)
    payload = json.loads(jwt.decrypt_jwe(token, keys.one_time))
    expected = {
        "data": {
            "paymentInformation": {
                "card": {"number": VISA, "expirationMonth": "12", "expirationYear": "2031"}
            }
        },
        "context": raw,
        "index": 0,
    }
    assert expected == payload


def test_jwe_header_is_pinned(keys) -> None:
    """The JWE header is RSA-OAEP, A256GCM, with the one-time kid."""
    ctx = verify(keys, fakes.sign_context(keys, fakes.context_claims(keys)))
    header = jwt.jwe_header(jose.encrypt_card_jwe(card(), ctx))
    assert {"alg": "RSA-OAEP", "enc": "A256GCM", "kid": keys.one_time_kid} == header


def test_jwe_rsa_oaep_256_variant_decrypts(keys) -> None:
    """RSA-OAEP-256 is available and decrypts with SHA-256 OAEP."""
    ctx = verify(keys, fakes.sign_context(keys, fakes.context_claims(keys)))
    token = jose.encrypt_card_jwe(card(), ctx, alg="RSA-OAEP-256")
    assert 0 == json.loads(jwt.decrypt_jwe(token, keys.one_time))["index"]


def test_missing_required_field_is_refused_before_encrypting(keys) -> None:
    """A card without the security code the context requires raises MissingRequiredField."""
    claims = fakes.context_claims(keys, required=(fields.CARD_NUMBER, fields.CARD_SECURITY_CODE))
    ctx = verify(keys, fakes.sign_context(keys, claims))
    with pytest.raises(MissingRequiredField) as info:
        jose.encrypt_card_jwe(card(code=None), ctx)
    assert fields.CARD_SECURITY_CODE == info.value.ids["field"]


def test_required_field_the_vault_cannot_hold_is_refused(keys) -> None:
    """A context requiring billTo data, which a card does not carry, is refused."""
    claims = fakes.context_claims(
        keys, required=(fields.CARD_NUMBER, "orderInformation.billTo.email")
    )
    ctx = verify(keys, fakes.sign_context(keys, claims))
    with pytest.raises(MissingRequiredField, match=r"billTo\.email"):
        jose.encrypt_card_jwe(card(), ctx)


def test_jwe_encrypted_twice_differs(keys) -> None:
    """Each JWE has a fresh CEK and IV."""
    ctx = verify(keys, fakes.sign_context(keys, fakes.context_claims(keys)))
    assert jose.encrypt_card_jwe(card(), ctx) != jose.encrypt_card_jwe(card(), ctx)


@pytest.fixture(scope="module")
def ctx(keys):
    return verify(keys, fakes.sign_context(keys, fakes.context_claims(keys)))


def verify_tt(ctx, token: str, *, now: float = fakes.NOW + 1):
    return jose.verify_transient_token(token, ctx, now=now)


def test_transient_token_verifies_with_the_one_time_key(keys, ctx) -> None:
    """A TT signed by the one-time key (published as use=enc) verifies and is typed."""
    tt = verify_tt(ctx, fakes.sign_token(keys, fakes.token_claims()))
    assert ("XXXXXXXXXXXX1111", "411111", "001", "Flex/08") == (
        tt.masked_pan,
        tt.bin,
        tt.card_type,
        tt.issuer,
    )


def test_detected_card_type_is_used_when_no_type_was_sent(keys, ctx) -> None:
    """Without type.value, the first detectedCardTypes entry is the card type."""
    claims = fakes.token_claims()
    card_content = claims["content"]["paymentInformation"]["card"]
    del card_content["type"]
    card_content["number"]["detectedCardTypes"] = ["002"]
    assert "002" == verify_tt(ctx, fakes.sign_token(keys, claims)).card_type


def test_transient_token_signed_by_another_key_fails(keys, ctx) -> None:
    """A TT signed by anything but the context's one-time key fails."""
    forged = jwt.sign_rs256(fakes.token_claims(), keys.long_term, keys.one_time_kid)
    with pytest.raises(TransientTokenInvalid, match="signature"):
        verify_tt(ctx, forged)


def test_transient_token_with_another_kid_fails(keys, ctx) -> None:
    """A TT whose kid is not the context's one-time kid fails."""
    forged = jwt.sign_rs256(fakes.token_claims(), keys.one_time, "someone-else")
    with pytest.raises(TransientTokenInvalid, match="kid"):
        verify_tt(ctx, forged)


def test_expired_transient_token_fails(keys, ctx) -> None:
    """A TT past exp raises TokenExpired."""
    with pytest.raises(TokenExpired):
        verify_tt(ctx, fakes.sign_token(keys, fakes.token_claims()), now=fakes.NOW + 900)


@pytest.mark.parametrize(
    ("claim", "value"), [("iss", "Evil/08"), ("type", "mf-2.0.0"), ("jti", None)]
)
def test_transient_token_claims_are_checked(keys, ctx, claim, value) -> None:
    """Issuer, type and jti are checked."""
    claims = fakes.token_claims() | {claim: value}
    with pytest.raises(TransientTokenInvalid):
        verify_tt(ctx, fakes.sign_token(keys, claims))


def test_validate_public_jwk_refuses_private_and_non_rsa_keys(keys) -> None:
    """A JWK with d, or not RSA, or without n, is refused."""
    good = keys.long_term_jwk()
    for bad in (good | {"d": "x"}, good | {"kty": "EC"}, {"kty": "RSA", "e": "AQAB"}, "str"):
        with pytest.raises(ValueError):
            jose.validate_public_jwk(bad)
    assert good == jose.validate_public_jwk(good)
