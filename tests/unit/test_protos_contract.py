"""No message the relay's gRPC services send or receive has a field that could hold card data.

Card data never crosses to the merchant side (DESIGN.md, "Security invariants"), so the wire
contract has no place to put it. Every field and oneof name of every message reachable from
MerchantGateway and PciRelay, and of every message in any relay/pb/v1/*_pb2.py, is checked against
CARD_DATA: a card number (pan, card_number), a security code (cvv, cvc, cvn, security_code)
or an expiry (expiration, expiry, anything else containing "expir", exp_month, expYear...).

ALLOWED names the few fields that look like card data but are not, each with its type:
- masked_pan (string): the number with all but the last four digits replaced by X;
- bin (string): the first six digits, which PCI DSS allows to be shown with the last four.
  It matches no pattern today; it is listed so that a tighter pattern keeps allowing it;
- expires_at (google.protobuf.Timestamp): when a capture context or transient token expires,
  not the card's expiry. As a string or a number it would be flagged.
Innocent names can match too (company contains "pan"): rename such a field (organization)
rather than grow ALLOWED.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from typing import TYPE_CHECKING

from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

import relay.pb.v1

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from google.protobuf.descriptor import Descriptor, FileDescriptor

CARD_DATA = re.compile(
    r"pan|card_?number|cvv|cvc|cvn|security_?code|expir|exp_?(month|year|date)", re.IGNORECASE
)
TIMESTAMP = "google.protobuf.Timestamp"
ALLOWED = {("masked_pan", "string"), ("bin", "string"), ("expires_at", TIMESTAMP)}
FILES = tuple(
    importlib.import_module(f"relay.pb.v1.{module.name}").DESCRIPTOR
    for module in pkgutil.iter_modules(relay.pb.v1.__path__)
    if module.name.endswith("_pb2")
)
SERVICES = ("relay.pb.v1.MerchantGateway", "relay.pb.v1.PciRelay")


def _type_of(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    return "string" if field.type == FieldDescriptor.TYPE_STRING else f"scalar {field.type}"


def _nested(message: Descriptor) -> Iterator[Descriptor]:
    yield message
    for inner in message.nested_types:
        yield from _nested(inner)


def _messages(files: Sequence[FileDescriptor]) -> list[Descriptor]:
    """Every message declared in the files or reachable from their services, transitively."""
    todo = [m for f in files for top in f.message_types_by_name.values() for m in _nested(top)]
    todo += [
        m
        for f in files
        for service in f.services_by_name.values()
        for method in service.methods
        for m in (method.input_type, method.output_type)
    ]
    seen: dict[str, Descriptor] = {}
    while todo:
        message = todo.pop()
        if message.full_name not in seen:
            seen[message.full_name] = message
            todo += [f.message_type for f in message.fields if f.message_type is not None]
    return list(seen.values())


def _card_data_names(messages: Sequence[Descriptor]) -> list[str]:
    """The fields and oneofs whose name looks like card data and is not allow-listed."""
    found = [
        f"{message.full_name}.{field.name} ({_type_of(field)})"
        for message in messages
        for field in message.fields
        if CARD_DATA.search(field.name) and (field.name, _type_of(field)) not in ALLOWED
    ]
    found += [
        f"{message.full_name}.{oneof.name} (oneof)"
        for message in messages
        for oneof in message.oneofs
        if CARD_DATA.search(oneof.name)
    ]
    return sorted(found)


def test_no_field_of_the_relay_protos_can_hold_card_data():
    """No field or oneof of any relay.pb.v1 message is named like a PAN, CVV or expiry."""
    offenders = _card_data_names(_messages(FILES))
    assert not offenders, f"fields that could carry card data: {offenders}"


def test_the_walk_covers_both_services_and_what_they_carry():
    """The walk reaches both services' requests, results, tokens and errors (no vacuous pass)."""
    names = {m.full_name for m in _messages(FILES)}
    services = {s.full_name for f in FILES for s in f.services_by_name.values()}
    assert services == set(SERVICES)
    assert {
        "relay.pb.v1.TokenRequest",
        "relay.pb.v1.TokenResult",
        "relay.pb.v1.TransientToken",
        "relay.pb.v1.PciTokenizeRequest",
        "relay.pb.v1.PciTransientToken",
        "relay.pb.v1.Error",
        "relay.pb.v1.FieldSpec",
        TIMESTAMP,
    } <= names


def _probe_message() -> Descriptor:
    """A throwaway message, in a private pool, with card-data fields and look-alikes."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="probe/card.proto",
        package="probe",
        dependency=["google/protobuf/timestamp.proto"],
    )
    message = proto.message_type.add(name="Card")
    string, msg = FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE
    fields = [
        ("pan", string, ""),
        ("cardNumber", string, ""),
        ("cvv", string, ""),
        ("security_code", string, ""),
        ("expiration_month", string, ""),
        ("card_expiry", string, ""),
        ("exp_month", string, ""),
        ("expYear", string, ""),
        ("expires_at", string, ""),
        ("masked_pan", string, ""),
        ("bin", string, ""),
        ("valid_until", msg, ".google.protobuf.Timestamp"),
        ("token_expires_at", msg, ".google.protobuf.Timestamp"),
        ("expires_at_ts", msg, ".google.protobuf.Timestamp"),
    ]
    for number, (name, kind, type_name) in enumerate(fields, start=1):
        field = message.field.add(name=name, number=number, type=kind, label=1)
        if type_name:
            field.type_name = type_name
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(timestamp)
    pool.Add(proto)
    return pool.FindMessageTypeByName("probe.Card")


def test_the_check_flags_card_data_and_allows_only_the_listed_look_alikes():
    """The check fails on PAN, CVV and expiry names, and allows expires_at only as a Timestamp."""
    assert _card_data_names([_probe_message()]) == [
        "probe.Card.cardNumber (string)",
        "probe.Card.card_expiry (string)",
        "probe.Card.cvv (string)",
        "probe.Card.expYear (string)",
        "probe.Card.exp_month (string)",
        "probe.Card.expiration_month (string)",
        "probe.Card.expires_at (string)",
        "probe.Card.expires_at_ts (google.protobuf.Timestamp)",
        "probe.Card.pan (string)",
        "probe.Card.security_code (string)",
        "probe.Card.token_expires_at (google.protobuf.Timestamp)",
    ]
