"""Test doubles: Flex keys and token factories built on the simulator's own JOSE code.

The simulator signs and decrypts with `cryptography` primitives, independently of the client's
jwcrypto code, so tokens made here are a fair test of relay.flex.jose.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.dev.flexsim import jwt
from relay.dev.flexsim.keys import new_rsa_key
from relay.flex import fields

ORIGIN = "https://flex.test"
NOW = 1_800_000_000


@dataclasses.dataclass(frozen=True)
class FlexKeys:
    """A long-term signing key and a one-time key, as one Flex session has them."""

    long_term: rsa.RSAPrivateKey
    one_time: rsa.RSAPrivateKey
    kid: str = "zu"
    one_time_kid: str = "08abcdefghijklmnopqrstuvwxyz0123"

    @classmethod
    def generate(cls) -> FlexKeys:
        """Fresh RSA-2048 keys."""
        return cls(new_rsa_key(), new_rsa_key())

    def long_term_jwk(self) -> dict[str, str]:
        """The bare JWK /public-keys serves for the long-term key."""
        return jwt.public_jwk(self.long_term.public_key(), self.kid)

    def one_time_jwk(self) -> dict[str, str]:
        """flx.jwk: the one-time public key."""
        return jwt.public_jwk(self.one_time.public_key(), self.one_time_kid)


def context_claims(
    keys: FlexKeys,
    *,
    now: int = NOW,
    ttl: int = 900,
    required: tuple[str, ...] = (fields.CARD_NUMBER,),
    optional: tuple[str, ...] = (
        fields.CARD_SECURITY_CODE,
        fields.CARD_EXPIRATION_MONTH,
        fields.CARD_EXPIRATION_YEAR,
        fields.CARD_TYPE,
    ),
) -> dict[str, Any]:
    """Claims of a capture context exactly as section 2 of the wire notes shows them."""
    return {
        "flx": {
            "path": "/flex/v2/tokens",
            "data": "NTaTH27qZUlODxRUBEKIrhAAEFAA=",
            "origin": ORIGIN,
            "jwk": keys.one_time_jwk(),
        },
        "ctx": [
            {
                "data": {"requiredFields": list(required), "optionalFields": list(optional)},
                "type": "api-0.1.0",
            }
        ],
        "iss": "Flex API",
        "exp": now + ttl,
        "iat": now,
        "jti": "rOAksGcp8Bgg6WLj",
    }


def sign_context(keys: FlexKeys, claims: dict[str, Any]) -> str:
    """A capture context signed RS256 by the long-term key."""
    return jwt.sign_rs256(claims, keys.long_term, keys.kid)


def token_claims(*, now: int = NOW, kid: str = "08") -> dict[str, Any]:
    """Claims of a transient token for a Visa card."""
    return {
        "iss": f"Flex/{kid[:2]}",
        "exp": now + 900,
        "type": "api-0.1.0",
        "iat": now,
        "jti": "1E0WC1GO87JG1BDP0CQ8SCR1TTK86U9N98H3WH8IFM9MVEWTIYFI62F4941E7A92",
        "content": {
            "paymentInformation": {
                "card": {
                    "number": {"maskedValue": "XXXXXXXXXXXX1111", "bin": "411111"},
                    "type": {"value": "001"},
                }
            }
        },
    }


def sign_token(keys: FlexKeys, claims: dict[str, Any]) -> str:
    """A transient token signed by the one-time key, as Flex signs it."""
    return jwt.sign_rs256(claims, keys.one_time, keys.one_time_kid)


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """An arbitrary compact JWS, for forgeries."""
    return ".".join(
        [
            jwt.b64url(json.dumps(header).encode()),
            jwt.b64url(json.dumps(claims).encode()),
            jwt.b64url(signature),
        ]
    )


def hs256_with_public_key(keys: FlexKeys, claims: dict[str, Any]) -> str:
    """The classic algorithm-confusion forgery: HS256 keyed with the RSA public key's PEM."""
    pem = keys.long_term.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"kid": keys.kid, "alg": "HS256"}
    signing_input = ".".join(
        [jwt.b64url(json.dumps(header).encode()), jwt.b64url(json.dumps(claims).encode())]
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{jwt.b64url(mac)}"


def b64(data: bytes) -> str:
    """Standard base64."""
    return base64.b64encode(data).decode()
