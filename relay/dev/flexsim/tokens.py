"""What /flex/v2/tokens checks in a decrypted payload, and the transient token it builds.

Reason codes (Flex's own for /tokens are not published; these follow the REST API's style):
INVALID_DATA for malformed input, MISSING_FIELD for an absent required field,
CAPTURE_CONTEXT_INVALID and CAPTURE_CONTEXT_EXPIRED for the context.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from relay.cards import detect_card_type, luhn_ok
from relay.flex import fields

_CARD_PREFIX = "paymentInformation.card."
_MICROFORM_CARD = {"number", "securityCode", "expirationMonth", "expirationYear", "type"}
_JTI_ALPHABET = string.ascii_uppercase + string.digits


class ApiError(Exception):
    """An error answered in the responseStatus envelope."""

    def __init__(self, status: int, reason: str, message: str, location: str = "") -> None:
        """Keep the parts of the envelope; message and location never carry input values."""
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.location = location


def invalid(message: str, location: str = "") -> ApiError:
    """A 400 INVALID_DATA error."""
    return ApiError(400, "INVALID_DATA", message, location)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """What flx.data carries: the session's one-time kid, context jti, expiry and merchant."""

    kid: str
    jti: str
    exp: int
    merchant_id: str

    def seal(self, key: bytes) -> str:
        """Encrypt into the opaque standard-base64 blob Flex puts in flx.data."""
        nonce = secrets.token_bytes(12)
        plain = json.dumps([self.kid, self.jti, self.exp, self.merchant_id]).encode()
        return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, plain, b"flx.data")).decode()

    @classmethod
    def open(cls, blob: object, key: bytes) -> SessionRecord:
        """Decrypt flx.data; raises ApiError if it was not sealed by this simulator."""
        try:
            raw = base64.b64decode(str(blob), validate=True)
            kid, jti, exp, merchant_id = json.loads(
                AESGCM(key).decrypt(raw[:12], raw[12:], b"flx.data")
            )
        except (ValueError, InvalidTag, TypeError):
            raise ApiError(400, "CAPTURE_CONTEXT_INVALID", "Capture context is invalid") from None
        return cls(str(kid), str(jti), int(exp), str(merchant_id))


def normalize_data(data: object) -> dict[str, str]:
    """Flatten nested or dotted `data` (or Microform's flat card) into dotted path -> value."""
    if not isinstance(data, Mapping):
        raise invalid("data must be an object", "data")
    flat: dict[str, str] = {}
    _flatten(data, "", flat)
    if set(flat) <= _MICROFORM_CARD:
        flat = {_CARD_PREFIX + name: value for name, value in flat.items()}
    return {path: value for path, value in flat.items() if value != ""}


def _flatten(node: Mapping[str, Any], prefix: str, out: dict[str, str]) -> None:
    for name, value in node.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping):
            _flatten(value, path + ".", out)
        elif isinstance(value, str):
            out[path] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            out[path] = str(value)
        else:
            raise invalid("field values must be strings", path)


def check_fields(
    values: Mapping[str, str], required: list[str], optional: list[str], today: dt.date
) -> None:
    """Every required field present, nothing unrequested, and card values sane."""
    for path in required:
        if path not in values:
            raise ApiError(400, "MISSING_FIELD", "Required field is missing", path)
    allowed = set(required) | set(optional)
    for path in values:
        if path not in allowed:
            raise invalid("Field was not requested by the capture context", path)
    _check_card(values, today)


def _check_card(values: Mapping[str, str], today: dt.date) -> None:
    number = values.get(fields.CARD_NUMBER, "")
    if not (number.isascii() and number.isdigit() and 13 <= len(number) <= 19 and luhn_ok(number)):
        raise invalid("Invalid card number format", fields.CARD_NUMBER)
    code = values.get(fields.CARD_SECURITY_CODE)
    if code is not None and not (code.isascii() and code.isdigit() and len(code) in (3, 4)):
        raise invalid("Invalid security code", fields.CARD_SECURITY_CODE)
    card_type = values.get(fields.CARD_TYPE)
    if card_type is not None and not (card_type.isdigit() and len(card_type) == 3):
        raise invalid("Invalid card type", fields.CARD_TYPE)
    _check_expiry(
        values.get(fields.CARD_EXPIRATION_MONTH), values.get(fields.CARD_EXPIRATION_YEAR), today
    )


def _check_expiry(month: str | None, year: str | None, today: dt.date) -> None:
    month_value = year_value = None
    if month is not None:
        if not (month.isdigit() and 1 <= int(month) <= 12):
            raise invalid("Invalid expiration month", fields.CARD_EXPIRATION_MONTH)
        month_value = int(month)
    if year is not None:
        if not (year.isdigit() and len(year) in (2, 4)):
            raise invalid("Invalid expiration year", fields.CARD_EXPIRATION_YEAR)
        year_value = int(year) + (2000 if len(year) == 2 else 0)
        if year_value < today.year or year_value > today.year + 50:
            raise invalid("Card has expired or year is out of range", fields.CARD_EXPIRATION_YEAR)
    if month_value and year_value and (year_value, month_value) < (today.year, today.month):
        raise invalid("Card has expired", fields.CARD_EXPIRATION_MONTH)


def token_content(values: Mapping[str, str]) -> dict[str, Any]:
    """The TT's `content`: masked number and BIN, type and expiry values, markers for the rest."""
    number = values[fields.CARD_NUMBER]
    card: dict[str, Any] = {
        "number": {"maskedValue": "X" * (len(number) - 4) + number[-4:], "bin": number[:6]}
    }
    detected = detect_card_type(number[:8])
    if fields.CARD_TYPE in values:
        card["type"] = {"value": values[fields.CARD_TYPE]}
    elif detected:
        card["number"]["detectedCardTypes"] = [detected]
    for name in ("expirationMonth", "expirationYear"):
        if _CARD_PREFIX + name in values:
            card[name] = {"value": values[_CARD_PREFIX + name]}
    if fields.CARD_SECURITY_CODE in values:
        card["securityCode"] = {}
    content: dict[str, Any] = {"paymentInformation": {"card": card}}
    for path in values:
        if path.startswith("orderInformation."):
            node = content
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = {}
    return content


def new_token_jti() -> str:
    """A 64-character upper-case alphanumeric jti, like Flex's."""
    return "".join(secrets.choice(_JTI_ALPHABET) for _ in range(64))
