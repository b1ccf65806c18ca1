"""Who is calling the gateway: the merchant app named by its mTLS client certificate.

The certificate was already verified by the TLS handshake against the apps' CA; here we only
read the name from it: the SAN URI `urn:relay:app:<id>`, never the CN, so a merchant's or a
server's certificate from the same CA names no app. The app scopes everything the gateway
keeps: request ids, tokens and the rate limit. Under --insecure-dev there is no certificate and
every caller is the one app DEV_APP: acceptable only on a developer's loopback.
"""

from __future__ import annotations

from typing import Any, Final

import grpc

from relay.errors import PermissionDenied
from relay.ids import is_valid_id
from relay.peers import app_from_cert

DEV_APP: Final = "dev-app"
"""The app of every call under --insecure-dev."""


def app_from_context(context: grpc.aio.ServicerContext[Any, Any], *, insecure_dev: bool) -> str:
    """The calling app's id, or PermissionDenied."""
    if insecure_dev:
        return DEV_APP
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    candidate = app_from_cert(pems[0]) if pems else None
    # An app id follows the merchant_id rules (relay.ids).
    if not (isinstance(candidate, str) and is_valid_id("merchant_id", candidate)):
        raise PermissionDenied("the caller's certificate names no app")
    return candidate
