"""HTTP Signature verification as the Cybersource gateway does it (wire notes, section 5.1).

Every check runs over the raw body bytes and the exact header values received. A failure is an
AuthFailure whose text becomes the gateway's `{"response": {"rmsg": ...}}` 401 body.
"""

from __future__ import annotations

import email.utils
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from relay.flex.signing import (
    ALGORITHM,
    body_digest,
    hmac_signature,
    parse_signature_header,
    signed_header_names,
    signing_string,
)
from relay.secrets import Secret

DATE_WINDOW_SECONDS = 300


class AuthFailure(Exception):
    """The request is not authenticated; the text is safe to send back."""


@dataclass(frozen=True, slots=True)
class MerchantKey:
    """One merchant's REST key: its merchant id, key id and decoded shared secret."""

    merchant_id: str
    key_id: str
    secret: Secret[bytes]


def verify_request(  # noqa: PLR0913  the request's parts, each used in the signing string
    *,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    merchants: Mapping[str, MerchantKey],
    now: float,
) -> MerchantKey:
    """Check the signed request and return the merchant key it was signed with."""
    required = ["v-c-merchant-id", "signature", "date", "host"]
    if method.upper() in {"POST", "PUT", "PATCH"}:
        required.append("digest")
    missing = [name for name in required if not headers.get(name)]
    if missing:
        raise AuthFailure("missing http required header : " + "".join(f"{m}," for m in missing))
    merchant = merchants.get(headers["v-c-merchant-id"])
    params = _signature_params(headers["signature"])
    if merchant is None or not hmac.compare_digest(params["keyid"], merchant.key_id):
        raise AuthFailure("Authentication Failed")
    _check_date(headers["date"], now)
    if "digest" in required and not hmac.compare_digest(headers["digest"], body_digest(body)):
        raise AuthFailure("Digest does not match the request body")
    names = params["headers"].split()
    missing_signed = [name for name in signed_header_names(method) if name not in names]
    if missing_signed:
        raise AuthFailure("Signature must cover " + " ".join(missing_signed))
    values = {name: headers.get(name, "") for name in names}
    values["request-target"] = f"{method.lower()} {target}"
    expected = hmac_signature(merchant.secret, signing_string(names, values))
    if not hmac.compare_digest(expected, params["signature"]):
        raise AuthFailure("Authentication Failed")
    return merchant


def _signature_params(value: str) -> dict[str, str]:
    try:
        params = parse_signature_header(value)
    except ValueError:
        raise AuthFailure("Signature header is malformed") from None
    for name in ("keyid", "algorithm", "headers", "signature"):
        if name not in params:
            raise AuthFailure(f"Signature header lacks {name}")
    if params["algorithm"] != ALGORITHM:
        raise AuthFailure(f"Signature algorithm must be {ALGORITHM}")
    if "(request-target)" in params["headers"].split():
        raise AuthFailure("(request-target) is no longer accepted; sign request-target")
    return params


def _check_date(value: str, now: float) -> None:
    try:
        sent = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        raise AuthFailure("Date header is malformed") from None
    if abs(sent - now) > DATE_WINDOW_SECONDS:
        raise AuthFailure("Date header is outside the allowed window")
