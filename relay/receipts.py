"""Signed release receipts: PciRelay's PAN-free, offline-verifiable record of each release.

A receipt is a compact JWS (EdDSA over Ed25519) that PciRelay signs for every transient token
it releases, and again for every replay of one. It names who asked (merchant, app,
request_id), what was released (card_ref, the capture context's jti, the token's jti and the
SHA-256 of the token's compact text) and when, and never card data. A merchant app verifies it
with the PCI side's public key alone: no call back, no key fetched from inside the token.

Like relay/flex/jose.py, this module keeps its jwcrypto objects to itself (a private JWK's
JSON carries `d`, STYLE leak 2): callers hand in and get back PEM bytes and strings.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwcrypto import jwk, jws
from jwcrypto.common import JWException

from relay.errors import ReceiptInvalid

RECEIPT_ALG = "EdDSA"
RECEIPT_TYPE = "relay-receipt+jwt"
RECEIPT_ISSUER = "relay-pci"
MAX_RECEIPT_BYTES = 4096
_CURVE = "Ed25519"
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "x5t", "crit"})
_TEXT_CLAIMS = ("merchant", "app", "request_id", "card_ref", "cc_jti", "tt_jti", "tt_sha256")


@dataclasses.dataclass(frozen=True, slots=True)
class Receipt:
    """The claims of one receipt: ids and a hash, never card data."""

    merchant: str
    app: str
    """The calling app's id, "" when the merchant side named none."""
    request_id: str
    card_ref: str
    cc_jti: str
    """The jti of the capture context the card was released under."""
    tt_jti: str
    tt_sha256: str
    """Hex SHA-256 of the transient token's compact text: binds the receipt to that token."""
    iat: int
    """Epoch seconds at signing; a replay's receipt carries its own."""
    iss: str = RECEIPT_ISSUER


def token_sha256(transient_token: str) -> str:
    """The tt_sha256 claim of a transient token: hex SHA-256 of its compact text."""
    return hashlib.sha256(transient_token.encode("ascii")).hexdigest()


def generate_receipt_key() -> bytes:
    """A new Ed25519 private key as PEM (PKCS8, unencrypted): mount it as a secret file."""
    key = jwk.JWK.generate(kty="OKP", crv=_CURVE)
    pem: bytes = key.export_to_pem(private_key=True, password=None)
    return pem


class ReceiptSigner:
    """Signs receipts with one Ed25519 private key; its repr shows only the kid."""

    __slots__ = ("_header", "_key", "_signing_key", "kid")

    def __init__(self, private_key_pem: bytes) -> None:
        """Load the key; ValueError (naming no key material) unless it is an Ed25519 private key."""
        try:
            key = jwk.JWK.from_pem(private_key_pem)
        except (ValueError, TypeError, JWException) as exc:
            raise ValueError("not a PEM private key") from exc
        if not (_is_ed25519(key) and key.has_private):
            raise ValueError("not an Ed25519 private key")
        self._key = key
        self.kid: str = key.thumbprint()
        """RFC 7638 thumbprint (SHA-256) of the public key, the kid of every receipt."""
        signing_key = key.get_op_key("sign")
        if not isinstance(signing_key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 private key")  # noqa: TRY004  one error for a bad key
        self._signing_key: Ed25519PrivateKey = signing_key
        header = {"alg": RECEIPT_ALG, "typ": RECEIPT_TYPE, "kid": self.kid}
        self._header: str = _b64(json.dumps(header, separators=(",", ":")).encode("ascii"))

    def __repr__(self) -> str:
        """Render the kid only, never the key."""
        return f"ReceiptSigner(kid={self.kid})"

    def __reduce__(self) -> Any:  # noqa: ANN401  refuses; never returns
        """Refuse pickling, so the private key cannot be copied out by accident."""
        raise TypeError("ReceiptSigner is not serializable")

    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo): what merchant apps verify with."""
        pem: bytes = self._key.export_to_pem(private_key=False, password=None)
        return pem

    def sign(self, claims: Receipt) -> str:
        """The compact JWS of these claims (RFC 7515, alg EdDSA per RFC 8037).

        Built here rather than through jwcrypto's JWS object, which costs about six times the
        Ed25519 signature itself; verify_receipt reads it with jwcrypto, as any JOSE library can.
        """
        payload = json.dumps(dataclasses.asdict(claims), separators=(",", ":"), sort_keys=True)
        signing_input = self._header + "." + _b64(payload.encode("utf-8"))
        signature = self._signing_key.sign(signing_input.encode("ascii"))
        return signing_input + "." + _b64(signature)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def verify_receipt(
    receipt: str, public_key_pem: bytes, *, transient_token: str | None = None
) -> Receipt:
    """The receipt's claims, once its signature under public_key_pem and its shape check out.

    alg must be exactly EdDSA and the kid that of the given key; header keys that point at a
    key elsewhere (jku, x5u, jwk, x5c) are refused, never followed. With transient_token, the
    receipt must also be the one for that very token (tt_sha256). Anything else: ReceiptInvalid.
    """
    key, kid = _public_key(public_key_pem)
    header = _checked_header(receipt, kid)
    try:
        token = jws.JWS()
        token.allowed_algs = [RECEIPT_ALG]
        token.deserialize(receipt)
        token.verify(key, alg=RECEIPT_ALG)
    except (JWException, ValueError, TypeError) as exc:
        raise ReceiptInvalid("receipt signature does not verify", kid=header["kid"]) from exc
    claims = _claims(token.payload)
    if transient_token is not None and not hmac.compare_digest(
        claims.tt_sha256, token_sha256(transient_token)
    ):
        raise ReceiptInvalid("receipt is for another transient token", request_id=claims.request_id)
    return claims


@functools.lru_cache(maxsize=16)
def _public_key(public_key_pem: bytes) -> tuple[jwk.JWK, str]:
    """The verification key and its kid, parsed once per PEM (an app verifies many receipts)."""
    try:
        key = jwk.JWK.from_pem(public_key_pem)
    except (ValueError, TypeError, JWException) as exc:
        raise ReceiptInvalid("receipt public key is not a PEM public key") from exc
    if not _is_ed25519(key) or key.has_private:
        raise ReceiptInvalid("receipt public key is not an Ed25519 public key")
    return key, key.thumbprint()


def _is_ed25519(key: jwk.JWK) -> bool:
    return bool(key.get("kty") == "OKP" and key.get("crv") == _CURVE)


def _checked_header(receipt: str, kid: str) -> dict[str, Any]:
    if len(receipt) > MAX_RECEIPT_BYTES:
        raise ReceiptInvalid("receipt is oversized")
    parts = receipt.split(".")
    if len(parts) != 3 or not all(parts):
        raise ReceiptInvalid("receipt is not a compact JWS")
    header = _b64_json(parts[0])
    if not isinstance(header, dict):
        raise ReceiptInvalid("receipt header is not a JSON object")
    if header.get("alg") != RECEIPT_ALG:
        raise ReceiptInvalid("receipt alg must be EdDSA")
    if header.get("typ") != RECEIPT_TYPE:
        raise ReceiptInvalid("receipt typ must be relay-receipt+jwt")
    if _FORBIDDEN_HEADERS & header.keys():
        raise ReceiptInvalid("receipt header points at a key elsewhere")
    if header.get("kid") != kid:
        raise ReceiptInvalid("receipt was signed by another key (its kid is not this key's)")
    return header


def _claims(payload: bytes) -> Receipt:
    try:
        claims = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReceiptInvalid("receipt payload is not JSON") from exc
    if not isinstance(claims, dict):
        raise ReceiptInvalid("receipt payload is not a JSON object")
    if not all(isinstance(claims.get(name), str) for name in _TEXT_CLAIMS):
        raise ReceiptInvalid("receipt lacks a text claim or has one of the wrong type")
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise ReceiptInvalid("receipt iat must be an integer")
    if claims.get("iss") != RECEIPT_ISSUER:
        raise ReceiptInvalid("receipt iss must be relay-pci")
    return Receipt(**{name: claims[name] for name in _TEXT_CLAIMS}, iat=iat)


def _b64_json(part: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise ReceiptInvalid("receipt header is not base64url JSON") from exc
