"""The format of card_refs and merchant ids: 1-64 characters of A-Z a-z 0-9 _ . : -.

Both end up in gRPC status metadata, log lines and audit records, so they are kept to a short,
printable, unambiguous alphabet: no whitespace, no separators a log parser could split on, and
too short to hold anything but an id. fullmatch, not match with "$", which would accept a
trailing newline.
"""

from __future__ import annotations

import re
from typing import Final

from relay.errors import InvalidCardData

__all__ = ["ID_PATTERN", "check_card_ref", "check_merchant_id", "is_valid_id"]

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_valid_id(value: object) -> bool:
    """Whether value is a well-formed card_ref or merchant id."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_card_ref(card_ref: object) -> None:
    """Raise InvalidCardData unless card_ref is well formed (the value is never echoed)."""
    if not is_valid_id(card_ref):
        raise InvalidCardData("card_ref must be 1-64 characters of A-Z a-z 0-9 _ . : -")


def check_merchant_id(merchant_id: object) -> None:
    """Raise InvalidCardData unless merchant_id is well formed (the value is never echoed)."""
    if not is_valid_id(merchant_id):
        raise InvalidCardData("merchant_id must be 1-64 characters of A-Z a-z 0-9 _ . : -")
