"""The RelayError tree: one status and one stable reason per class, and no enumeration oracle."""

from __future__ import annotations

import grpc
import pytest

from relay import errors
from relay.errors import CardNotFound, ConfigError, FlexRejected, NotGranted, RelayError

S = grpc.StatusCode

# Every class of relay/errors.py: (status, reason, status set in the class itself, retryable).
# A status is inherited on purpose in five places: TransientTokenInvalid and FlexError are
# INTERNAL like their base (their subclasses say more), ConfigError never reaches the wire,
# NotGranted must answer exactly as CardNotFound does, and OutcomeUnknown is an Unavailable
# that says more.
EXPECTED: dict[str, tuple[grpc.StatusCode, str, bool, bool]] = {
    "RelayError": (S.INTERNAL, "INTERNAL", True, False),
    "CaptureContextInvalid": (S.INVALID_ARGUMENT, "CAPTURE_CONTEXT_INVALID", True, False),
    "CaptureContextExpired": (S.FAILED_PRECONDITION, "CAPTURE_CONTEXT_EXPIRED", True, True),
    "CaptureContextReused": (S.FAILED_PRECONDITION, "CAPTURE_CONTEXT_REUSED", True, False),
    "TransientTokenInvalid": (S.INTERNAL, "TRANSIENT_TOKEN_INVALID", False, False),
    "TokenExpired": (S.FAILED_PRECONDITION, "TOKEN_EXPIRED", True, False),
    "InvalidCardData": (S.INVALID_ARGUMENT, "INVALID_CARD_DATA", True, False),
    "InvalidFieldSpec": (S.INVALID_ARGUMENT, "INVALID_FIELD_SPEC", True, False),
    "MissingRequiredField": (S.FAILED_PRECONDITION, "MISSING_REQUIRED_FIELD", True, False),
    "CardNotFound": (S.NOT_FOUND, "CARD_NOT_FOUND", True, False),
    "NotGranted": (S.NOT_FOUND, "CARD_NOT_FOUND", False, False),
    "TokenNotFound": (S.NOT_FOUND, "TOKEN_NOT_FOUND", True, False),
    "PermissionDenied": (S.PERMISSION_DENIED, "PERMISSION_DENIED", True, False),
    "RateLimited": (S.RESOURCE_EXHAUSTED, "RATE_LIMITED", True, True),
    "InvalidRequest": (S.INVALID_ARGUMENT, "INVALID_REQUEST", True, False),
    "DeadlineExceeded": (S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", True, True),
    "Withdrawn": (S.CANCELLED, "WITHDRAWN", True, True),
    "Unavailable": (S.UNAVAILABLE, "UNAVAILABLE", True, True),
    "OutcomeUnknown": (S.UNAVAILABLE, "OUTCOME_UNKNOWN", False, True),
    "FlexError": (S.INTERNAL, "FLEX_ERROR", False, False),
    "FlexRejected": (S.FAILED_PRECONDITION, "FLEX_REJECTED", True, False),
    "FlexAuthFailed": (S.FAILED_PRECONDITION, "FLEX_AUTH_FAILED", True, False),
    "FlexUnavailable": (S.UNAVAILABLE, "FLEX_UNAVAILABLE", True, True),
    "FlexResponseInvalid": (S.UNAVAILABLE, "FLEX_RESPONSE_INVALID", True, False),
    "PublicKeyNotFound": (S.INVALID_ARGUMENT, "PUBLIC_KEY_NOT_FOUND", True, False),
    "ReceiptInvalid": (S.INVALID_ARGUMENT, "RECEIPT_INVALID", True, False),
    "ConfigError": (S.INTERNAL, "CONFIG_ERROR", False, False),
}


def _tree(cls: type[RelayError]) -> list[type[RelayError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_tree(sub))
    return found


def _class_name(cls: type[RelayError]) -> str:
    return cls.__name__


# Only the classes of relay/errors.py: tests or other modules may define their own subclasses.
CLASSES = [cls for cls in _tree(RelayError) if cls.__module__ == errors.__name__]
OWN_REASON = [cls for cls in CLASSES if cls is not NotGranted]


def test_the_table_lists_every_class_of_the_module():
    """A new error class must be added to EXPECTED, with its status chosen on purpose."""
    assert sorted(EXPECTED) == sorted(cls.__name__ for cls in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=_class_name)
def test_each_class_has_its_expected_status_reason_and_retryability(cls):
    """status, reason, whether the status is the class's own, and retryable match the table."""
    actual = (cls.status, cls.reason, "status" in cls.__dict__, cls.retryable)
    assert EXPECTED[cls.__name__] == actual


@pytest.mark.parametrize("cls", OWN_REASON, ids=_class_name)
def test_each_class_but_not_granted_sets_its_own_reason(cls):
    """A reason is never inherited by accident: each class but NotGranted defines one itself."""
    assert "reason" in cls.__dict__


def test_reasons_are_unique_apart_from_not_granted():
    """No two classes share a reason, except NotGranted, which reuses CardNotFound's."""
    reasons = [cls.reason for cls in OWN_REASON]
    assert sorted(set(reasons)) == sorted(reasons)


def test_not_granted_answers_exactly_as_card_not_found():
    """Same status, reason and message, and caught by except CardNotFound: no oracle."""
    message = "card not found"
    granted, missing = NotGranted(message, card_ref="c-1"), CardNotFound(message, card_ref="c-1")
    assert (True, missing.status, missing.reason, str(missing), missing.ids) == (
        isinstance(granted, CardNotFound),
        granted.status,
        granted.reason,
        str(granted),
        granted.ids,
    )


@pytest.mark.parametrize("cls", OWN_REASON, ids=_class_name)
def test_by_reason_maps_each_reason_to_its_class(cls):
    """A client re-raises by reason: each reason maps back to the class that defines it."""
    assert cls is RelayError.by_reason[cls.reason]


def test_by_reason_maps_card_not_found_to_card_not_found():
    """The shared reason maps to CardNotFound, never NotGranted, on the client side."""
    assert CardNotFound is RelayError.by_reason["CARD_NOT_FOUND"]


@pytest.mark.parametrize("cls", [c for c in CLASSES if c is not ConfigError], ids=_class_name)
def test_the_module_docstring_tree_lists_each_class_with_its_status_and_reason(cls):
    """The tree in the module docstring (httpx style) agrees with the classes."""
    lines = (errors.__doc__ or "").splitlines()
    rows = [line for line in lines if cls.__name__ in line.replace(",", " ").split()]
    assert [True] == [cls.status.name in row and cls.reason in row for row in rows]


def test_ids_are_kept_next_to_the_message():
    """A RelayError keeps its fixed message and its ids separately."""
    error = RelayError("capture context rejected", request_id="r-1", kid="k-2")
    assert ("capture context rejected", {"request_id": "r-1", "kid": "k-2"}) == (
        error.message,
        error.ids,
    )


def test_flex_errors_keep_the_http_status_and_flex_reason():
    """FlexRejected carries the HTTP status and Flex's own reason code."""
    error = FlexRejected("Flex rejected the token request", http_status=400, flex_reason="INVALID")
    assert (400, "INVALID", "FLEX_REJECTED") == (error.http_status, error.flex_reason, error.reason)


def test_config_error_collects_every_problem():
    """ConfigError keeps every problem, in order, and names them all in its message."""
    problems = ["RELAY_LISTEN is missing", "RELAY_KEK_FILE is not readable"]
    error = ConfigError(problems)
    problems.append("added later")
    assert (
        ["RELAY_LISTEN is missing", "RELAY_KEK_FILE is not readable"],
        "invalid configuration: RELAY_LISTEN is missing; RELAY_KEK_FILE is not readable",
    ) == (error.problems, str(error))
