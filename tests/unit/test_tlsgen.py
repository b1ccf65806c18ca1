"""Test PKI: what a client certificate says about its merchant."""

from __future__ import annotations

from cryptography import x509

from relay import peers
from relay.dev import tlsgen


def test_client_certificate_names_its_merchant() -> None:
    """The SAN URI names the merchant, and the CA signed it."""
    ca = tlsgen.new_ca()
    client = tlsgen.issue_client(ca, "merchant-42")
    cert = x509.load_pem_x509_certificate(client.cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    assert "merchant-42" == peers.merchant_from_cert(client.cert_pem)


def test_common_name_alone_names_no_merchant() -> None:
    """A certificate without the merchant URI (a server's, say) identifies no merchant."""
    ca = tlsgen.new_ca()
    server = tlsgen.issue_server(ca, ("localhost",))
    assert peers.merchant_from_cert(server.cert_pem) is None


def test_issued_repr_hides_the_key() -> None:
    """An Issued pair's repr does not show its private key."""
    issued = tlsgen.issue_client(tlsgen.new_ca(), "m")
    assert b"PRIVATE KEY" in issued.key_pem
    assert "PRIVATE" not in repr(issued)


def test_app_certificate_names_its_app_and_no_merchant() -> None:
    """issue_app writes `urn:relay:app:<id>`: an app, never a merchant."""
    ca = tlsgen.new_ca()
    app = tlsgen.issue_app(ca, "shop-app")
    cert = x509.load_pem_x509_certificate(app.cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    assert "shop-app" == peers.app_from_cert(app.cert_pem)
    assert peers.merchant_from_cert(app.cert_pem) is None


def test_merchant_or_server_certificate_names_no_app() -> None:
    """Only the app SAN URI names an app: a merchant's CN or URI does not, nor a server's."""
    ca = tlsgen.new_ca()
    assert peers.app_from_cert(tlsgen.issue_client(ca, "shop-app").cert_pem) is None
    assert peers.app_from_cert(tlsgen.issue_server(ca, ("shop-app",)).cert_pem) is None
