"""Release receipts: a round trip, and every forgery a merchant app must refuse offline."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwcrypto import jwk, jws

from relay.errors import ReceiptInvalid
from relay.receipts import (
    RECEIPT_TYPE,
    Receipt,
    ReceiptSigner,
    generate_receipt_key,
    token_sha256,
    verify_receipt,
)

TOKEN = "eyJraWQiOiJ0dCJ9.eyJqdGkiOiJ0dC0xIn0.c2lnbmF0dXJl"
CLAIMS = Receipt(
    merchant="m-alpha",
    app="app-1",
    request_id="order-1",
    card_ref="card-visa",
    cc_jti="cc-1",
    tt_jti="tt-1",
    tt_sha256=token_sha256(TOKEN),
    iat=1_790_000_000,
)


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    """One receipt private key (PEM) for the module."""
    return generate_receipt_key()


@pytest.fixture(scope="module")
def signer(key_pem: bytes) -> ReceiptSigner:
    """The PCI side's signer over key_pem."""
    return ReceiptSigner(key_pem)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(value: object) -> str:
    return _b64(json.dumps(value).encode())


def _as_dict(receipt: Receipt) -> dict[str, Any]:
    return {name: getattr(receipt, name) for name in Receipt.__dataclass_fields__}


def _header(signer: ReceiptSigner, **changes: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": RECEIPT_TYPE, "kid": signer.kid, **changes}


def _signed_with(key: jwk.JWK, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A compact JWS that jwcrypto signs with key under exactly this protected header."""
    token = jws.JWS(json.dumps(claims).encode())
    token.add_signature(key, alg=header["alg"], protected=json.dumps(header))
    compact: str = token.serialize(compact=True)
    return compact


def _ed25519_jwk() -> jwk.JWK:
    return jwk.JWK.from_pem(generate_receipt_key())


def test_a_signed_receipt_verifies_to_its_claims(signer: ReceiptSigner):
    """sign then verify (bound to the token) gives back exactly the claims signed."""
    receipt = signer.sign(CLAIMS)
    assert CLAIMS == verify_receipt(receipt, signer.public_pem(), transient_token=TOKEN)


def test_the_header_names_the_alg_type_and_key_thumbprint(signer: ReceiptSigner):
    """alg EdDSA, typ relay-receipt+jwt, kid the RFC 7638 thumbprint of the public key."""
    header = json.loads(base64.urlsafe_b64decode(signer.sign(CLAIMS).split(".")[0] + "=="))
    thumbprint = jwk.JWK.from_pem(signer.public_pem()).thumbprint()
    assert {"alg": "EdDSA", "typ": RECEIPT_TYPE, "kid": thumbprint} == header


def test_the_payload_holds_ids_and_a_hash_only(signer: ReceiptSigner):
    """The payload's claims are exactly the receipt's: nothing else can carry card data."""
    payload = json.loads(base64.urlsafe_b64decode(signer.sign(CLAIMS).split(".")[1] + "=="))
    assert _as_dict(CLAIMS) == payload


def test_a_tampered_payload_is_refused(signer: ReceiptSigner):
    """Claims changed after signing (another card_ref) no longer match the signature."""
    header, _, signature = signer.sign(CLAIMS).split(".")
    forged = f"{header}.{_json(_as_dict(CLAIMS) | {'card_ref': 'card-amex'})}.{signature}"
    with pytest.raises(ReceiptInvalid, match="signature does not verify"):
        verify_receipt(forged, signer.public_pem())


def test_a_tampered_signature_is_refused(signer: ReceiptSigner):
    """One flipped bit in the signature is enough to refuse the receipt."""
    header, payload, signature = signer.sign(CLAIMS).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[0] ^= 1
    with pytest.raises(ReceiptInvalid, match="signature does not verify"):
        verify_receipt(f"{header}.{payload}.{_b64(bytes(raw))}", signer.public_pem())


def test_a_receipt_signed_by_another_key_is_refused(signer: ReceiptSigner):
    """A receipt from some other Ed25519 key fails under the PCI side's key."""
    other = ReceiptSigner(generate_receipt_key())
    with pytest.raises(ReceiptInvalid, match="another key"):
        verify_receipt(other.sign(CLAIMS), signer.public_pem())


def test_another_key_claiming_the_right_kid_is_refused(signer: ReceiptSigner):
    """Copying the PCI side's kid into a receipt signed by another key does not help."""
    forged = _signed_with(_ed25519_jwk(), _header(signer), _as_dict(CLAIMS))
    with pytest.raises(ReceiptInvalid, match="signature does not verify"):
        verify_receipt(forged, signer.public_pem())


def test_alg_none_is_refused(signer: ReceiptSigner):
    """An unsigned receipt (alg none, empty or junk signature) is refused."""
    unsigned = f"{_json(_header(signer, alg='none'))}.{_json(_as_dict(CLAIMS))}"
    for forged in (f"{unsigned}.", f"{unsigned}.{_b64(b'x')}"):
        with pytest.raises(ReceiptInvalid):
            verify_receipt(forged, signer.public_pem())


def test_hs256_keyed_with_the_public_key_is_refused(signer: ReceiptSigner):
    """The classic confusion: an HMAC keyed with the public key's PEM is not a signature."""
    signing_input = f"{_json(_header(signer, alg='HS256'))}.{_json(_as_dict(CLAIMS))}"
    mac = hmac.new(signer.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(ReceiptInvalid, match="alg must be EdDSA"):
        verify_receipt(f"{signing_input}.{_b64(mac)}", signer.public_pem())


def test_rs256_is_refused(signer: ReceiptSigner):
    """A receipt signed RS256 by any RSA key is refused, whatever kid it claims."""
    rsa_key = jwk.JWK.generate(kty="RSA", size=2048)
    forged = _signed_with(rsa_key, _header(signer, alg="RS256"), _as_dict(CLAIMS))
    with pytest.raises(ReceiptInvalid, match="alg must be EdDSA"):
        verify_receipt(forged, signer.public_pem())


@pytest.mark.parametrize("name", ["jwk", "jku", "x5u"])
def test_a_header_pointing_at_a_key_elsewhere_is_never_followed(signer: ReceiptSigner, name):
    """An attacker's own key, embedded (jwk) or pointed at (jku, x5u), is refused outright."""
    attacker = _ed25519_jwk()
    value: object = attacker.export_public(as_dict=True)
    if name != "jwk":
        value = "https://attacker.example/keys"
    header = _header(signer, kid=attacker.thumbprint(), **{name: value})
    with pytest.raises(ReceiptInvalid, match="points at a key elsewhere"):
        verify_receipt(_signed_with(attacker, header, _as_dict(CLAIMS)), signer.public_pem())


def test_a_receipt_for_another_token_is_refused(signer: ReceiptSigner):
    """Given the token it came with, a receipt naming another token's hash is refused."""
    with pytest.raises(ReceiptInvalid, match="another transient token"):
        verify_receipt(signer.sign(CLAIMS), signer.public_pem(), transient_token=TOKEN + "x")


@pytest.mark.parametrize(
    "changes",
    [{"iat": "1790000000"}, {"iat": True}, {"card_ref": 7}, {"iss": "someone-else"}],
    ids=["iat-text", "iat-bool", "card-ref-number", "iss"],
)
def test_claims_of_the_wrong_type_or_issuer_are_refused(
    signer: ReceiptSigner, key_pem: bytes, changes
):
    """Even correctly signed, a payload with a mistyped claim or a foreign iss is refused."""
    key = jwk.JWK.from_pem(key_pem)
    forged = _signed_with(key, _header(signer), _as_dict(CLAIMS) | changes)
    with pytest.raises(ReceiptInvalid):
        verify_receipt(forged, signer.public_pem())


def test_a_missing_receipt_is_refused(signer: ReceiptSigner):
    """A token that came without a receipt ("") does not verify."""
    with pytest.raises(ReceiptInvalid, match="not a compact JWS"):
        verify_receipt("", signer.public_pem(), transient_token=TOKEN)


def test_the_signer_takes_only_an_ed25519_private_key():
    """An RSA key or a public key is refused at load time, with a message naming no key."""
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = ReceiptSigner(generate_receipt_key()).public_pem()
    refused = []
    for pem in (rsa_pem, public_pem, b"junk"):
        with pytest.raises(ValueError, match="private key") as info:
            ReceiptSigner(pem)
        refused.append("BEGIN" not in str(info.value))
    assert [True, True, True] == refused


def test_the_signer_repr_shows_the_kid_only(signer: ReceiptSigner):
    """The signer's repr carries no key material, and it refuses pickling."""
    assert f"ReceiptSigner(kid={signer.kid})" == repr(signer)
    with pytest.raises(TypeError):
        signer.__reduce__()


def test_generated_keys_are_pkcs8_ed25519():
    """generate_receipt_key gives an unencrypted PKCS8 PEM of a fresh Ed25519 key."""
    pem = generate_receipt_key()
    key = serialization.load_pem_private_key(pem, password=None)
    assert (True, True) == (
        pem.startswith(b"-----BEGIN PRIVATE KEY-----"),
        isinstance(key, ed25519.Ed25519PrivateKey),
    )


def _relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_receipt_key_generate_writes_0600_and_public_prints_its_public_half(tmp_path: Path):
    """`relay pci receipt-key generate` makes a 0600 key; `public` prints what apps verify with."""
    key_file = tmp_path / "receipt.key"
    generated = _relay("pci", "receipt-key", "generate", "--out", str(key_file))
    public = _relay("pci", "receipt-key", "public", "--key", str(key_file))
    signer = ReceiptSigner(key_file.read_bytes())
    mode = stat.S_IMODE(key_file.stat().st_mode)
    assert (0, 0o600, 0, signer.public_pem().decode()) == (
        generated.returncode,
        mode,
        public.returncode,
        public.stdout,
    )


def test_receipt_key_generate_never_overwrites(tmp_path: Path):
    """An existing file is left as it was and the command exits 2 with one line."""
    key_file = tmp_path / "receipt.key"
    key_file.write_bytes(b"kept")
    done = _relay("pci", "receipt-key", "generate", "--out", str(key_file))
    assert (2, b"kept", 1) == (
        done.returncode,
        key_file.read_bytes(),
        len(done.stderr.splitlines()),
    )
    assert "already exists" in done.stderr
