"""Who is calling, as logs and audit records name it: read from the verified client certificate.

The TLS handshake has already verified the certificate against the client CA; here we only
name it. A SAN URI `urn:relay:merchant:<id>` or `urn:relay:app:<id>` gives `merchant:<id>` or
`app:<id>`; a certificate without one is named by its SHA-256 (`sha256:<hex>`), so a refusal
of a certificate that names nobody still says which certificate it was. Under --insecure-dev
there is no certificate, and the peer is `insecure-dev`: nothing the caller says about itself
is taken as its identity here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Final

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from relay.ids import is_valid_id

__all__ = [
    "APP_URI_PREFIX",
    "INSECURE_DEV",
    "MERCHANT_URI_PREFIX",
    "UNREADABLE",
    "Peer",
    "app_from_cert",
    "merchant_from_cert",
    "name_from_cert",
    "peer_from_pem",
    "peer_of",
]

INSECURE_DEV: Final = "insecure-dev"
"""The peer of a plaintext call: no certificate, so no identity."""

UNREADABLE: Final = "unreadable-certificate"
"""The peer of a call whose verified certificate cryptography cannot parse."""

MERCHANT_URI_PREFIX: Final = "urn:relay:merchant:"
"""A merchant's client certificate names it in a SAN URI with this prefix, never in its CN."""

APP_URI_PREFIX: Final = "urn:relay:app:"
"""A merchant app's client certificate names it in a SAN URI with this prefix."""

_URI_KINDS: Final = ((MERCHANT_URI_PREFIX, "merchant:"), (APP_URI_PREFIX, "app:"))


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """A caller's identity and the fingerprint of its certificate ("" without one)."""

    identity: str
    cert_sha256: str = ""

    def log_fields(self) -> dict[str, str]:
        """`peer`, and `peer_cert_sha256` when there is a certificate."""
        fields = {"peer": self.identity}
        if self.cert_sha256:
            fields["peer_cert_sha256"] = self.cert_sha256
        return fields


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
    """The peer of a call, from the certificate its TLS handshake verified."""
    pems = list(context.auth_context().get("x509_pem_cert") or ())
    if not pems:
        return Peer(INSECURE_DEV)
    return peer_from_pem(bytes(pems[0]))


@functools.lru_cache(maxsize=256)
def peer_from_pem(pem: bytes) -> Peer:
    """The identity a PEM certificate names (cached: a few clients call many times)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        # Verified by the TLS library yet not parseable here: still a peer, named as such.
        return Peer(UNREADABLE)
    digest = cert.fingerprint(hashes.SHA256()).hex()
    return Peer(_san_identity(cert) or f"sha256:{digest}", digest)


def merchant_from_cert(cert_pem: bytes) -> str | None:
    """The merchant a client certificate names in its SAN URI `urn:relay:merchant:<id>`.

    Only the URI counts, never the CN: a CA that also issues app or server certificates must
    not turn their common names into merchant identities.
    """
    return name_from_cert(cert_pem, MERCHANT_URI_PREFIX)


def app_from_cert(cert_pem: bytes) -> str | None:
    """The app a client certificate names in its SAN URI `urn:relay:app:<id>` (never its CN)."""
    return name_from_cert(cert_pem, APP_URI_PREFIX)


def name_from_cert(cert_pem: bytes, prefix: str) -> str | None:
    """What follows prefix in the certificate's first SAN URI that starts with it, else None.

    The caller checks the name against its id rules: this only reads it.
    """
    return _first_named(_san_uris(x509.load_pem_x509_certificate(cert_pem)), prefix)


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return []  # named by its fingerprint instead: a refusal must still be reported
    return list(sans.get_values_for_type(x509.UniformResourceIdentifier))


def _first_named(uris: list[str], prefix: str) -> str | None:
    return next((uri[len(prefix) :] for uri in uris if uri.startswith(prefix)), None)


def _san_identity(cert: x509.Certificate) -> str | None:
    for uri in _san_uris(cert):
        for prefix, kind in _URI_KINDS:
            # The id is shown in clear: only one that passes the id rules is used.
            if uri.startswith(prefix) and is_valid_id("merchant_id", uri[len(prefix) :]):
                return kind + uri[len(prefix) :]
    return None
