"""Cybersource HTTP Signature (wire notes, section 5.1), one implementation for both ends.

The signing string is `name: value` per signed header, joined by newlines, no trailing newline;
the signature is base64(HMAC-SHA256(base64decode(secret), signing string)). The Digest covers
the exact body bytes, which is why HTTPSignatureAuth asks httpx for the body before signing.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Generator, Mapping, Sequence

import httpx

from relay.secrets import Secret

ALGORITHM = "HmacSHA256"
HEADERS_WITH_BODY = ("host", "date", "request-target", "digest", "v-c-merchant-id")
HEADERS_WITHOUT_BODY = ("host", "date", "request-target", "v-c-merchant-id")
_PARAM = re.compile(r'\s*([a-zA-Z]+)\s*=\s*"([^"]*)"\s*(?:,|$)')


def body_digest(body: bytes) -> str:
    """The Digest header value for a body: `SHA-256=` and the base64 SHA-256 of the bytes."""
    return "SHA-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")


def signed_header_names(method: str) -> tuple[str, ...]:
    """The headers Cybersource signs for a method: a Digest only where there is a body."""
    return HEADERS_WITH_BODY if method.upper() in {"POST", "PUT", "PATCH"} else HEADERS_WITHOUT_BODY


def signing_string(names: Sequence[str], values: Mapping[str, str]) -> str:
    """Join `name: value` for each signed header, in order, without a trailing newline."""
    return "\n".join(f"{name}: {values[name]}" for name in names)


def hmac_signature(secret: Secret[bytes], text: str) -> str:
    """Base64 HMAC-SHA256 of the signing string under the (already base64-decoded) secret."""
    mac = hmac.new(secret.get_secret_value(), text.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode("ascii")


def decode_shared_secret(b64_secret: str) -> Secret[bytes]:
    """Decode the base64 shared secret as Cybersource issues it. Raises ValueError if malformed."""
    try:
        raw = base64.b64decode(b64_secret.strip(), validate=True)
    except ValueError:
        raise ValueError("shared secret is not valid base64") from None
    if not raw:
        raise ValueError("shared secret is empty")
    return Secret(raw)


def signature_header(key_id: str, names: Sequence[str], signature: str) -> str:
    """Render the Signature header exactly as the Cybersource SDKs do."""
    return (
        f'keyid="{key_id}", algorithm="{ALGORITHM}", '
        f'headers="{" ".join(names)}", signature="{signature}"'
    )


def parse_signature_header(value: str) -> dict[str, str]:
    """Parse `k="v", ...` into a dict. Raises ValueError on anything else."""
    params: dict[str, str] = {}
    position = 0
    while position < len(value):
        match = _PARAM.match(value, position)
        if match is None:
            raise ValueError("malformed Signature header")
        params[match.group(1).lower()] = match.group(2)
        position = match.end()
    return params


def http_date(timestamp: float) -> str:
    """An RFC 7231 IMF-fixdate in GMT, as the Date header wants it."""
    return email.utils.formatdate(timestamp, usegmt=True)


class HTTPSignatureAuth(httpx.Auth):
    """Signs each request with the merchant's shared secret, over the exact body bytes sent."""

    requires_request_body = True

    def __init__(
        self,
        merchant_id: str,
        key_id: str,
        shared_secret: Secret[bytes],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Keep the credentials; clock is injectable so tests can sign at a fixed time."""
        self._merchant_id = merchant_id
        self._key_id = key_id
        self._secret = shared_secret
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Add Date, Digest, v-c-merchant-id and Signature, then send."""
        names = signed_header_names(request.method)
        target = request.url.raw_path.decode("ascii")
        values = {
            "host": request.headers["host"],
            "date": http_date(self._clock()),
            "request-target": f"{request.method.lower()} {target}",
            "v-c-merchant-id": self._merchant_id,
        }
        if "digest" in names:
            values["digest"] = body_digest(request.content)
            request.headers["Digest"] = values["digest"]
        request.headers["Date"] = values["date"]
        request.headers["v-c-merchant-id"] = self._merchant_id
        signature = hmac_signature(self._secret, signing_string(names, values))
        request.headers["Signature"] = signature_header(self._key_id, names, signature)
        yield request
