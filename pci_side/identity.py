"""Who is calling: the merchant named by the mTLS client certificate.

The certificate was already verified by the TLS handshake against the configured client CA;
here we only read the name from it: the SAN URI `urn:relay:merchant:<id>`, never the CN. Under
--insecure-dev there is no certificate, and the id comes from the `x-relay-merchant-id`
metadata: acceptable only on a developer's loopback.
"""

from __future__ import annotations

from typing import Any

import grpc

from relay.errors import PermissionDenied
from relay.ids import is_valid_id
from relay.peers import merchant_from_cert

MERCHANT_METADATA_KEY = "x-relay-merchant-id"


def merchant_from_context(
    context: grpc.aio.ServicerContext[Any, Any], *, insecure_dev: bool
) -> str:
    """The calling merchant's id, or PermissionDenied."""
    if insecure_dev:
        metadata = dict(context.invocation_metadata() or ())
        candidate = metadata.get(MERCHANT_METADATA_KEY)
    else:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        candidate = merchant_from_cert(pems[0]) if pems else None
    if not (isinstance(candidate, str) and is_valid_id("merchant_id", candidate)):
        raise PermissionDenied("the caller does not identify a merchant")
    return candidate
