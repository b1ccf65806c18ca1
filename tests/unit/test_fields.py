"""Flex v2 field specs: the sessions request body, its parser, and the allow-list."""

from __future__ import annotations

import pytest

from relay.errors import InvalidFieldSpec
from relay.flex import fields
from relay.flex.fields import (
    DEFAULT_FIELDS,
    FieldSpec,
    parse_session_request,
    session_request_body,
    validate_fields,
)

# The example body of the wire notes, section 1 (DOC-GEN CTV page / SPEC example1).
WIRE_NOTES_EXAMPLE = {
    "fields": {
        "paymentInformation": {
            "card": {
                "number": {},
                "securityCode": {"required": False},
                "expirationMonth": {"required": False},
                "expirationYear": {"required": False},
                "type": {"required": False},
            }
        }
    }
}

NUMBER: dict[str, object] = {"paymentInformation": {"card": {"number": {}}}}

ADDRESS_FIELDS = (
    FieldSpec(fields.CARD_NUMBER),
    FieldSpec("orderInformation.amountDetails.totalAmount"),
    FieldSpec("orderInformation.amountDetails.currency"),
    FieldSpec("orderInformation.billTo.email", required=False),
    FieldSpec("orderInformation.billTo.phoneNumber", required=False),
    FieldSpec("orderInformation.billTo.postalCode"),
    FieldSpec("orderInformation.shipTo.address1", required=False),
    FieldSpec("orderInformation.shipTo.company", required=False),
)


def invalid(call, *args) -> InvalidFieldSpec:
    with pytest.raises(InvalidFieldSpec) as info:
        call(*args)
    return info.value


def test_the_default_body_is_the_wire_notes_example():
    """DEFAULT_FIELDS renders exactly the wire notes' example: number {}, the rest optional."""
    assert WIRE_NOTES_EXAMPLE == session_request_body(DEFAULT_FIELDS)


def test_parsing_the_wire_notes_example_gives_the_defaults():
    """parse_session_request is the inverse of session_request_body for the example body."""
    assert DEFAULT_FIELDS == parse_session_request(WIRE_NOTES_EXAMPLE)


def test_an_explicit_required_true_is_required():
    """A leaf {"required": true} means required, the same as {}."""
    body = {"fields": {"paymentInformation": {"card": {"number": {"required": True}}}}}
    assert (FieldSpec(fields.CARD_NUMBER, required=True),) == parse_session_request(body)


def test_address_and_amount_fields_round_trip():
    """billTo, shipTo and amountDetails paths are accepted and survive body and parse."""
    body = session_request_body(ADDRESS_FIELDS)
    assert {"email": {"required": False}, "phoneNumber": {"required": False}, "postalCode": {}} == (
        body["fields"]["orderInformation"]["billTo"]  # type: ignore[index]
    )
    assert ADDRESS_FIELDS == parse_session_request(body)


@pytest.mark.parametrize(
    "path",
    [
        "orderInformation.shipTo.email",
        "orderInformation.shipTo.phoneNumber",
        "paymentInformation.card.pin",
        "paymentInformation.card",
        "targetOrigins",
    ],
)
def test_validate_refuses_paths_outside_the_allow_list(path: str):
    """A path the Flex schema lacks (shipTo.email among them) is refused, named in ids."""
    error = invalid(validate_fields, [FieldSpec(fields.CARD_NUMBER), FieldSpec(path)])
    assert {"field": path} == error.ids


def test_validate_refuses_a_duplicate_path():
    """The same path listed twice is refused, named in ids."""
    specs = [
        FieldSpec(fields.CARD_NUMBER),
        FieldSpec(fields.CARD_TYPE),
        FieldSpec(fields.CARD_TYPE),
    ]
    assert {"field": fields.CARD_TYPE} == invalid(validate_fields, specs).ids


@pytest.mark.parametrize(
    "specs",
    [
        [],
        [FieldSpec(fields.CARD_NUMBER, required=False)],
        [FieldSpec(fields.CARD_SECURITY_CODE), FieldSpec(fields.CARD_TYPE)],
    ],
    ids=["empty", "optional-number", "no-number"],
)
def test_a_spec_without_a_required_card_number_is_refused(specs: list[FieldSpec]):
    """The card number must be requested, and as required."""
    error = invalid(validate_fields, specs)
    assert {} == error.ids
    assert fields.CARD_NUMBER in error.message


def test_session_request_body_validates_first():
    """session_request_body refuses a spec validate_fields refuses, before building anything."""
    specs = [FieldSpec(fields.CARD_NUMBER), FieldSpec("orderInformation.shipTo.email")]
    assert {"field": "orderInformation.shipTo.email"} == invalid(session_request_body, specs).ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            {"fields": {"paymentInformation": {"card": {"number": {}, "pin": {}}}}},
            "paymentInformation.card.pin",
        ),
        (
            {"fields": {**NUMBER, "orderInformation": {"shipTo": {"email": {}}}}},
            "orderInformation.shipTo.email",
        ),
        ({"fields": {**NUMBER, "merchantDefined": {"x": {}}}}, "merchantDefined"),
        ({"fields": NUMBER, "targetOrigins": ["https://shop.test"]}, "targetOrigins"),
        (
            {"fields": {"paymentInformation": {"card": {"number": True}}}},
            "paymentInformation.card.number",
        ),
        (
            {"fields": {"paymentInformation": {"card": {"number": {}, "type": "001"}}}},
            "paymentInformation.card.type",
        ),
        (
            {"fields": {"paymentInformation": {"card": {"number": {"required": "false"}}}}},
            "paymentInformation.card.number",
        ),
        (
            {"fields": {"paymentInformation": {"card": {"number": {"required": 0}}}}},
            "paymentInformation.card.number",
        ),
        (
            {"fields": {"paymentInformation": {"card": {"number": {"optional": True}}}}},
            "paymentInformation.card.number",
        ),
        ({"fields": {**NUMBER, "orderInformation": []}}, "orderInformation"),
    ],
    ids=[
        "unknown-leaf",
        "shipTo-email",
        "unknown-branch",
        "unknown-top-level-member",
        "non-object-leaf",
        "string-leaf",
        "string-required",
        "int-required",
        "unknown-leaf-member",
        "non-object-branch",
    ],
)
def test_parse_refuses_a_malformed_body_naming_the_field(body: dict[str, object], field: str):
    """Each malformed request is InvalidFieldSpec with the offending path in ids["field"]."""
    assert {"field": field} == invalid(parse_session_request, body).ids


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "fields",
        {},
        {"fields": []},
        {"fields": {}},
        {"fields": {"paymentInformation": {"card": {"securityCode": {}}}}},
        {"fields": {"paymentInformation": {"card": {"number": {"required": False}}}}},
    ],
    ids=["null", "list", "string", "no-fields", "fields-list", "fields-empty", "no-number", "opt"],
)
def test_parse_refuses_a_body_without_fields_or_number(body: object):
    """A body that is not an object with a 'fields' object requesting the card number is refused."""
    assert {} == invalid(parse_session_request, body).ids
