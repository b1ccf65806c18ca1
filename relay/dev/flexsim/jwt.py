"""The simulator's own compact JWS (RS256) and JWE (RSA-OAEP[-256] + A256GCM) on `cryptography`."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

JWE_ALGS = {"RSA-OAEP": hashes.SHA1, "RSA-OAEP-256": hashes.SHA256}


class TokenError(Exception):
    """A token the simulator cannot parse, verify or decrypt."""


def b64url(data: bytes) -> str:
    """Base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises TokenError."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


def json_part(text: str) -> dict[str, Any]:
    """Decode one base64url JSON object part of a compact token."""
    try:
        value = json.loads(b64url_decode(text))
    except (ValueError, UnicodeDecodeError):
        raise TokenError("not JSON") from None
    if not isinstance(value, dict):
        raise TokenError("not a JSON object")
    return value


def public_jwk(key: rsa.RSAPublicKey, kid: str) -> dict[str, str]:
    """The bare JWK Flex serves: kty, use=enc, kid, n, e."""
    numbers = key.public_numbers()
    return {
        "kty": "RSA",
        "use": "enc",
        "kid": kid,
        "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")),
    }


def sign_rs256(claims: dict[str, Any], key: rsa.RSAPrivateKey, kid: str) -> str:
    """A compact RS256 JWS with header {kid, alg} (Flex sends no typ)."""
    header = b64url(json.dumps({"kid": kid, "alg": "RS256"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64url(signature)}"


def verify_rs256(token: str, key: rsa.RSAPublicKey) -> dict[str, Any]:
    """Verify a compact RS256 JWS and return its claims; raises TokenError."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a compact JWS")
    if json_part(parts[0]).get("alg") != "RS256":
        raise TokenError("not RS256")
    try:
        key.verify(
            b64url_decode(parts[2]),
            f"{parts[0]}.{parts[1]}".encode("ascii"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (InvalidSignature, UnicodeEncodeError):
        raise TokenError("bad signature") from None
    return json_part(parts[1])


def jwe_header(token: str) -> dict[str, Any]:
    """The protected header of a compact JWE, unverified."""
    parts = token.split(".")
    if len(parts) != 5:
        raise TokenError("not a compact JWE")
    return json_part(parts[0])


def decrypt_jwe(token: str, key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt a compact JWE (RSA-OAEP or RSA-OAEP-256, A256GCM); raises TokenError."""
    header = jwe_header(token)
    protected, wrapped, iv, ciphertext, tag = token.split(".")
    hash_type = JWE_ALGS.get(str(header.get("alg")))
    if hash_type is None or header.get("enc") != "A256GCM":
        raise TokenError("unsupported JWE algorithm")
    oaep = padding.OAEP(mgf=padding.MGF1(hash_type()), algorithm=hash_type(), label=None)
    try:
        cek = key.decrypt(b64url_decode(wrapped), oaep)
        return AESGCM(cek).decrypt(
            b64url_decode(iv), b64url_decode(ciphertext) + b64url_decode(tag), protected.encode()
        )
    except (ValueError, InvalidTag):
        raise TokenError("cannot decrypt") from None
