"""JOSE for Flex v2: the only module that touches jwcrypto.

Recipes, not primitives: callers get verify_capture_context, encrypt_card_jwe and
verify_transient_token with algorithms pinned to the wire notes. A jwcrypto JWK or JWE never
leaves this module (their reprs can carry a private exponent or a plaintext, STYLE leaks 2, 3).
jwcrypto reads time.time(), so claims are checked here against an explicit `now`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from typing import Any

from jwcrypto import jwe, jwk, jws
from jwcrypto.common import JWException

from relay.cards import CardData
from relay.errors import (
    CaptureContextExpired,
    CaptureContextInvalid,
    MissingRequiredField,
    RelayError,
    TokenExpired,
    TransientTokenInvalid,
)
from relay.flex import fields
from relay.flex.models import (
    CONTEXT_ISSUER,
    TOKENS_PATH,
    CaptureContext,
    TransientToken,
)

SIGNING_ALG = "RS256"
JWE_ALG = "RSA-OAEP"
JWE_ENC = "A256GCM"
MAX_CONTEXT_BYTES = 16 * 1024
MAX_TOKEN_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})


class _TokenShape(Exception):
    """A compact token that is not what it claims to be."""


def unverified_header(token: str) -> dict[str, Any]:
    """Decode the protected header of a compact JWS without trusting it."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise _TokenShape("not a compact JWS")
    header = _b64_json(parts[0])
    if not isinstance(header, dict):
        raise _TokenShape("header is not an object")
    return header


def context_kid(unverified_cc: str) -> str:
    """Check the capture context's shape and header, and return the long-term kid to fetch."""
    if len(unverified_cc) > MAX_CONTEXT_BYTES:
        raise CaptureContextInvalid("capture context is oversized")
    try:
        header = unverified_header(unverified_cc)
    except _TokenShape:
        raise CaptureContextInvalid("capture context is not a compact JWS") from None
    _check_jws_header(header, CaptureContextInvalid, "capture context")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 64:
        raise CaptureContextInvalid("capture context header has no usable kid")
    return kid


def verify_capture_context(  # noqa: PLR0913  the key and the claims' knobs, keyword-only
    unverified_cc: str,
    public_key: Mapping[str, Any],
    *,
    now: float,
    allowed_origins: frozenset[str],
    leeway: int = 60,
    ignore_expiry: bool = False,
) -> CaptureContext:
    """Verify a capture context's signature and every claim; return the typed context.

    ignore_expiry: for a context the caller itself created and sent before, asked about again;
    never for one about to carry a card.
    """
    kid = context_kid(unverified_cc)
    claims = _verified_claims(unverified_cc, public_key, CaptureContextInvalid, "capture context")
    ctx = _capture_context_from(unverified_cc, kid, claims)
    if ctx.issued_at > now + leeway:
        raise CaptureContextInvalid("capture context is issued in the future", jti=ctx.jti)
    if ctx.origin not in allowed_origins:
        raise CaptureContextInvalid("capture context origin is not allowed", jti=ctx.jti)
    # Last: an expired context has passed every other check (a repeat may still be answered).
    if ctx.expires_at <= now and not ignore_expiry:
        raise CaptureContextExpired("capture context has expired", jti=ctx.jti)
    return ctx


def encrypt_card_jwe(card: CardData, ctx: CaptureContext, *, alg: str = JWE_ALG) -> str:
    """Encrypt exactly the fields the context asks for into a compact JWE under its one-time key."""
    payload = {"data": _card_fields(card, ctx), "context": ctx.raw, "index": 0}
    header = {"alg": alg, "enc": JWE_ENC, "kid": ctx.one_time_kid}
    try:
        token = jwe.JWE(
            json.dumps(payload, separators=(",", ":")).encode("utf-8"),
            protected=json.dumps(header, separators=(",", ":")),
            algs=[JWE_ALG, "RSA-OAEP-256", JWE_ENC],
        )
        token.add_recipient(_public_key(ctx.one_time_jwk))
        return str(token.serialize(compact=True))
    except (JWException, ValueError, TypeError):
        # from None: the jwcrypto objects in the chained frames hold the plaintext.
        raise RelayError("could not encrypt the card payload", jti=ctx.jti) from None


def verify_transient_token(
    unverified_tt: str, ctx: CaptureContext, *, now: float, leeway: int = 60
) -> TransientToken:
    """Verify a transient token against the one-time key of the capture context it came from."""
    if len(unverified_tt) > MAX_TOKEN_BYTES:
        raise TransientTokenInvalid("transient token is oversized", jti=ctx.jti)
    try:
        header = unverified_header(unverified_tt)
    except _TokenShape:
        raise TransientTokenInvalid("transient token is not a compact JWS") from None
    _check_jws_header(header, TransientTokenInvalid, "transient token")
    if header.get("kid") != ctx.one_time_kid:
        raise TransientTokenInvalid("transient token kid does not match the context", jti=ctx.jti)
    claims = _verified_claims(
        unverified_tt, ctx.one_time_jwk, TransientTokenInvalid, "transient token"
    )
    token = _transient_token_from(unverified_tt, ctx, claims)
    if token.issued_at > now + leeway:
        raise TransientTokenInvalid("transient token is issued in the future", jti=token.jti)
    if token.expires_at <= now:
        raise TokenExpired("transient token has expired", jti=token.jti)
    return token


def signature_valid(unverified_token: str, public_key: Mapping[str, Any]) -> bool:
    """Whether the RS256 signature alone verifies; used to decide on a key refetch."""
    try:
        _verified_claims(unverified_token, public_key, CaptureContextInvalid, "token")
    except CaptureContextInvalid:
        return False
    return True


def validate_public_jwk(candidate: object) -> dict[str, str]:
    """Check a JWK from /public-keys or flx.jwk is an RSA public key of useful size."""
    if not isinstance(candidate, Mapping):
        raise ValueError("key is not a JSON object")  # noqa: TRY004  one error type for callers
    if candidate.get("kty") != "RSA" or "d" in candidate:
        raise ValueError("key is not an RSA public key")
    modulus, exponent = candidate.get("n"), candidate.get("e")
    if not isinstance(modulus, str) or not isinstance(exponent, str):
        raise ValueError("key lacks n or e")  # noqa: TRY004  one error type for callers
    try:
        bits = int.from_bytes(_b64url_decode(modulus), "big").bit_length()
    except (binascii.Error, ValueError):
        raise ValueError("key modulus is not base64url") from None
    if bits < MIN_RSA_BITS:
        raise ValueError("key is shorter than 2048 bits")
    return {name: str(value) for name, value in candidate.items() if isinstance(value, str)}


def _check_jws_header(header: Mapping[str, Any], error: type[RelayError], what: str) -> None:
    if header.get("alg") != SIGNING_ALG:
        raise error(f"{what} must be signed with RS256")
    if _FORBIDDEN_HEADERS & set(header):
        raise error(f"{what} header names a key location; refusing it")


def _verified_claims(
    token: str, public_key: Mapping[str, Any], error: type[RelayError], what: str
) -> dict[str, Any]:
    try:
        signed = jws.JWS()
        signed.deserialize(token)
        signed.allowed_algs = [SIGNING_ALG]
        signed.verify(_public_key(public_key), alg=SIGNING_ALG)
        claims = json.loads(signed.payload)
    except (JWException, ValueError, TypeError, KeyError):
        raise error(f"{what} signature does not verify") from None
    if not isinstance(claims, dict):
        raise error(f"{what} claims are not an object")
    return claims


@functools.lru_cache(maxsize=512)
def _cached_public_key(kty: str, modulus: str, exponent: str) -> jwk.JWK:
    return jwk.JWK(kty=kty, n=modulus, e=exponent)


def _public_key(key: Mapping[str, Any]) -> jwk.JWK:
    # Only kty, n and e: a copy without `use`, since jwcrypto refuses to verify with use=enc and
    # Flex publishes the one-time key as use=enc while signing the transient token with it.
    return _cached_public_key(str(key.get("kty")), str(key.get("n")), str(key.get("e")))


def _capture_context_from(raw: str, kid: str, claims: Mapping[str, Any]) -> CaptureContext:
    invalid = CaptureContextInvalid
    jti = _claim(claims, "jti", str, invalid)
    if claims.get("iss") != CONTEXT_ISSUER:
        raise invalid("capture context has the wrong issuer", jti=jti)
    flx = _claim(claims, "flx", dict, invalid)
    if flx.get("path") != TOKENS_PATH:
        raise invalid("capture context has the wrong tokens path", jti=jti)
    origin = flx.get("origin")
    if not isinstance(origin, str) or not origin.startswith(("https://", "http://")):
        raise invalid("capture context has no usable origin", jti=jti)
    one_time = _one_time_key(flx.get("jwk"), jti)
    ctx_type, required, optional = _context_entry(claims.get("ctx"), jti)
    return CaptureContext(
        raw=raw,
        kid=kid,
        jti=jti,
        issued_at=_claim(claims, "iat", int, invalid),
        expires_at=_claim(claims, "exp", int, invalid),
        origin=origin.rstrip("/"),
        path=TOKENS_PATH,
        context_type=ctx_type,
        one_time_kid=one_time["kid"],
        one_time_jwk=one_time,
        required_fields=required,
        optional_fields=optional,
    )


def _one_time_key(candidate: object, jti: str) -> dict[str, str]:
    try:
        key = validate_public_jwk(candidate)
    except ValueError:
        raise CaptureContextInvalid("capture context one-time key is unusable", jti=jti) from None
    if key.get("use") != "enc" or not key.get("kid"):
        raise CaptureContextInvalid("capture context one-time key is not a use=enc key", jti=jti)
    return key


def _context_entry(ctx: object, jti: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    invalid = CaptureContextInvalid
    if not isinstance(ctx, list) or not ctx or not isinstance(ctx[0], dict):
        raise invalid("capture context has no ctx entry", jti=jti)
    entry = ctx[0]
    data = entry.get("data")
    ctx_type = entry.get("type")
    if not isinstance(ctx_type, str) or not isinstance(data, dict):
        raise invalid("capture context ctx entry is malformed", jti=jti)
    required = data.get("requiredFields", [])
    optional = data.get("optionalFields", [])
    for names in (required, optional):
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise invalid("capture context field lists are malformed", jti=jti)
    if fields.CARD_NUMBER not in required:
        raise invalid("capture context does not require the card number", jti=jti)
    return ctx_type, tuple(required), tuple(optional)


def _transient_token_from(
    raw: str, ctx: CaptureContext, claims: Mapping[str, Any]
) -> TransientToken:
    invalid = TransientTokenInvalid
    jti = _claim(claims, "jti", str, invalid)
    issuer = _claim(claims, "iss", str, invalid)
    if not issuer.startswith("Flex/"):
        raise invalid("transient token has the wrong issuer", jti=jti)
    token_type = _claim(claims, "type", str, invalid)
    if token_type != ctx.context_type:
        raise invalid("transient token type does not match the context", jti=jti)
    card = _card_content(claims)
    number = _object(card.get("number"))
    card_type = _object(card.get("type"))
    detected = number.get("detectedCardTypes") or card.get("detectedCardTypes") or [""]
    return TransientToken(
        raw=raw,
        jti=jti,
        kid=ctx.one_time_kid,
        issuer=issuer,
        token_type=token_type,
        issued_at=_claim(claims, "iat", int, invalid),
        expires_at=_claim(claims, "exp", int, invalid),
        masked_pan=str(number.get("maskedValue", "")),
        bin=str(number.get("bin", "")),
        card_type=str(
            card_type.get("value") or (detected[0] if isinstance(detected, list) else "")
        ),
    )


def _card_content(claims: Mapping[str, Any]) -> dict[str, Any]:
    node = _object(claims.get("content"))
    for part in ("paymentInformation", "card"):
        node = _object(node.get(part))
    return node


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _card_fields(card: CardData, ctx: CaptureContext) -> dict[str, Any]:
    available = {
        fields.CARD_NUMBER: card.pan.reveal(),
        fields.CARD_EXPIRATION_MONTH: f"{card.expiration_month:02d}",
        fields.CARD_EXPIRATION_YEAR: f"{card.expiration_year:04d}",
    }
    if card.security_code is not None:
        available[fields.CARD_SECURITY_CODE] = card.security_code.reveal()
    if card.card_type:
        available[fields.CARD_TYPE] = card.card_type
    missing = [path for path in ctx.required_fields if path not in available]
    if missing:
        raise MissingRequiredField(
            f"card lacks required field {missing[0]}", field=missing[0], jti=ctx.jti
        )
    wanted = set(ctx.required_fields) | set(ctx.optional_fields)
    nested: dict[str, Any] = {}
    for path, value in available.items():
        if path in wanted:
            *parents, leaf = path.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return nested


def _claim(claims: Mapping[str, Any], name: str, kind: type, error: type[RelayError]) -> Any:  # noqa: ANN401
    value = claims.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise error(f"claim {name} is missing or malformed")
    return value


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64_json(text: str) -> Any:  # noqa: ANN401
    try:
        return json.loads(_b64url_decode(text))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _TokenShape("not base64url JSON") from None
