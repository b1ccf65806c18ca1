"""Checks on TLS files made before they reach grpc, so a bad file gets a message of its own.

grpc reports every problem with its credentials the same way (a server "cannot listen", a
channel that never connects), which sends people looking at ports and firewalls. These checks
parse the PEM files with `cryptography` first and name the file at fault. Messages carry the
names the caller gives (a variable and a file's base name), never key material.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from relay.errors import ConfigError


def check_key_pair(cert_pem: bytes, key_pem: bytes, *, cert_name: str, key_name: str) -> None:
    """Raise ConfigError unless key_pem is the private key of cert_pem's first certificate.

    cert_name and key_name are how the message names the files, e.g.
    "RELAY_PCI_TLS_CERT_FILE (server.crt)". A chain file is fine: its first certificate is the
    one the key must match, as it is for grpc.
    """
    cert = _first_certificate(cert_pem, f"the TLS certificate {cert_name}")
    key = _private_key(key_pem, f"the TLS key {key_name}")
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise ConfigError([f"the TLS key {key_name} does not match its certificate {cert_name}"])


def check_ca_bundle(ca_pem: bytes, *, name: str) -> None:
    """Raise ConfigError unless ca_pem holds PEM certificates (and nothing unparseable)."""
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ConfigError([f"the TLS CA file {name} is not a PEM certificate bundle"]) from None


def _first_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ConfigError([f"{what} is not a PEM certificate"]) from None


def _private_key(pem: bytes, what: str) -> PrivateKeyTypes:
    # cryptography's own texts are dropped (from None): the file's name is what a person needs,
    # and nothing read from a key file should reach a message.
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ConfigError([f"{what} is encrypted: grpc needs an unencrypted PEM key"]) from None
    except UnsupportedAlgorithm:
        raise ConfigError([f"{what} is a kind of key TLS here cannot use"]) from None
    except ValueError:
        raise ConfigError([f"{what} is not a PEM private key"]) from None


def _spki(key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo: equal for a certificate and its key, whatever the algorithm."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
