"""Throwaway certificates for the demo and the tests: a CA, server and client certificates.

A client certificate names its holder in a SAN URI: a merchant `urn:relay:merchant:<id>`, the
only identity the PCI side accepts, or a merchant's app `urn:relay:app:<id>`, the only identity
the MerchantGateway accepts (the CN repeats it for people reading the certificate).
Keys are EC P-256: fast to make, and what a modern internal PKI issues.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.peers import APP_URI_PREFIX, MERCHANT_URI_PREFIX


@dataclasses.dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes = dataclasses.field(repr=False)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write NAME.crt and NAME.key (mode 0600) into directory."""
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.chmod(0o600)  # touch keeps the mode of a file that exists already
        key.write_bytes(self.key_pem)
        return cert, key


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def new_ca(common_name: str = "relay test CA", *, days: int = 2) -> Issued:
    """A self-signed CA certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(_cert_pem(cert), _key_pem(key))


def issue_server(ca: Issued, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
    """A server certificate for the given DNS names and IP addresses."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _issue(ca, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH)


def issue_client(ca: Issued, merchant_id: str) -> Issued:
    """A client certificate naming a merchant (CN and SAN URI), for calling PciRelay."""
    return _issue_named(ca, MERCHANT_URI_PREFIX, merchant_id)


def issue_app(ca: Issued, app_id: str) -> Issued:
    """A client certificate naming a merchant's app (CN and SAN URI), for calling the gateway."""
    return _issue_named(ca, APP_URI_PREFIX, app_id)


def issue_nameless_client(ca: Issued, common_name: str) -> Issued:
    """A client certificate with no SAN, only a CN: what must never pass for an identity."""
    return _issue(ca, common_name, [], ExtendedKeyUsageOID.CLIENT_AUTH)


def _issue_named(ca: Issued, prefix: str, name: str) -> Issued:
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(prefix + name)]
    return _issue(ca, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH)


def _issue(
    ca: Issued, common_name: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier
) -> Issued:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(ca_cert.not_valid_after_utc)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(_cert_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
