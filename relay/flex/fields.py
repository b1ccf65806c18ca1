"""Flex v2 field specs: which payment fields a capture context asks for, and their wire form.

A session request lists fields as a nested object whose leaves are `{"required": bool}`; a field
listed without `required` is required (wire notes, section 1). Both the client, which builds the
request, and the simulator, which parses it, use this one module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from relay.errors import InvalidFieldSpec

CARD_NUMBER = "paymentInformation.card.number"
CARD_SECURITY_CODE = "paymentInformation.card.securityCode"
CARD_EXPIRATION_MONTH = "paymentInformation.card.expirationMonth"
CARD_EXPIRATION_YEAR = "paymentInformation.card.expirationYear"
CARD_TYPE = "paymentInformation.card.type"

_BILL_TO = [
    "address1",
    "address2",
    "administrativeArea",
    "buildingNumber",
    "country",
    "district",
    "locality",
    "postalCode",
    "email",
    "firstName",
    "lastName",
    "phoneNumber",
    "company",
]
_SHIP_TO = [
    "address1",
    "address2",
    "administrativeArea",
    "buildingNumber",
    "country",
    "district",
    "locality",
    "postalCode",
    "firstName",
    "lastName",
    "company",
]

ALLOWED_FIELDS: frozenset[str] = frozenset(
    [CARD_NUMBER, CARD_SECURITY_CODE, CARD_EXPIRATION_MONTH, CARD_EXPIRATION_YEAR, CARD_TYPE]
    + ["orderInformation.amountDetails.totalAmount", "orderInformation.amountDetails.currency"]
    + [f"orderInformation.billTo.{name}" for name in _BILL_TO]
    + [f"orderInformation.shipTo.{name}" for name in _SHIP_TO]
)


@dataclasses.dataclass(frozen=True, slots=True)
class FieldSpec:
    """One requested field: its dotted Flex path and whether the payer must supply it."""

    path: str
    required: bool = True


DEFAULT_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(CARD_NUMBER),
    FieldSpec(CARD_SECURITY_CODE, required=False),
    FieldSpec(CARD_EXPIRATION_MONTH, required=False),
    FieldSpec(CARD_EXPIRATION_YEAR, required=False),
    FieldSpec(CARD_TYPE, required=False),
)


def validate_fields(fields: Iterable[FieldSpec]) -> tuple[FieldSpec, ...]:
    """Check paths against the Flex allow-list, refuse duplicates, and require the card number."""
    checked = tuple(fields)
    seen: set[str] = set()
    for spec in checked:
        if spec.path not in ALLOWED_FIELDS:
            raise InvalidFieldSpec(f"unknown Flex field {spec.path!r}", field=spec.path)
        if spec.path in seen:
            raise InvalidFieldSpec(f"field {spec.path!r} listed twice", field=spec.path)
        seen.add(spec.path)
    if not any(spec.path == CARD_NUMBER and spec.required for spec in checked):
        raise InvalidFieldSpec(f"{CARD_NUMBER} must be requested as a required field")
    return checked


def session_request_body(fields: Sequence[FieldSpec]) -> dict[str, object]:
    """Build the JSON body of POST /flex/v2/sessions from a field spec."""
    root: dict[str, object] = {}
    for spec in validate_fields(fields):
        node = root
        *parents, leaf = spec.path.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[leaf] = {} if spec.required else {"required": False}
    return {"fields": root}


def parse_session_request(body: object) -> tuple[FieldSpec, ...]:
    """Parse a sessions request body into field specs, or raise InvalidFieldSpec."""
    if not isinstance(body, Mapping) or not isinstance(body.get("fields"), Mapping):
        raise InvalidFieldSpec("request body must be an object with a 'fields' object")
    unknown_top = sorted(set(body) - {"fields"})
    if unknown_top:
        raise InvalidFieldSpec(f"unknown request member {unknown_top[0]!r}", field=unknown_top[0])
    return validate_fields(_leaves(body["fields"], ""))


def _leaves(node: Mapping[str, object], prefix: str) -> list[FieldSpec]:
    specs: list[FieldSpec] = []
    for name, value in node.items():
        path = f"{prefix}{name}"
        if path not in ALLOWED_FIELDS and not _is_branch(path):
            raise InvalidFieldSpec(f"unknown Flex field {path!r}", field=path)
        if not isinstance(value, Mapping):
            raise InvalidFieldSpec(f"field {path!r} must be an object", field=path)
        if path in ALLOWED_FIELDS:
            specs.append(FieldSpec(path, _required_flag(value, path)))
        elif not value:
            raise InvalidFieldSpec(f"{path!r} names no field", field=path)
        else:
            specs.extend(_leaves(value, path + "."))
    return specs


def _is_branch(path: str) -> bool:
    return any(field.startswith(path + ".") for field in ALLOWED_FIELDS)


def _required_flag(leaf: Mapping[str, object], path: str) -> bool:
    extra = sorted(set(leaf) - {"required"})
    if extra:
        raise InvalidFieldSpec(f"field {path!r} has unknown member {extra[0]!r}", field=path)
    required = leaf.get("required", True)
    if not isinstance(required, bool):
        raise InvalidFieldSpec(f"field {path!r}: 'required' must be a boolean", field=path)
    return required
