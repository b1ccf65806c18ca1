"""Relay errors. Each class fixes a gRPC status and a stable reason.

RelayError                       INTERNAL             INTERNAL
 +- CaptureContextInvalid        INVALID_ARGUMENT     CAPTURE_CONTEXT_INVALID
 |   +- CaptureContextExpired    FAILED_PRECONDITION  CAPTURE_CONTEXT_EXPIRED
 +- CaptureContextReused         FAILED_PRECONDITION  CAPTURE_CONTEXT_REUSED (one release per CC)
 +- TransientTokenInvalid        INTERNAL             TRANSIENT_TOKEN_INVALID
 |   +- TokenExpired             FAILED_PRECONDITION  TOKEN_EXPIRED
 +- InvalidCardData              INVALID_ARGUMENT     INVALID_CARD_DATA
 +- InvalidFieldSpec             INVALID_ARGUMENT     INVALID_FIELD_SPEC
 +- MissingRequiredField         FAILED_PRECONDITION  MISSING_REQUIRED_FIELD
 +- CardNotFound, NotGranted     NOT_FOUND            CARD_NOT_FOUND (one answer, no oracle)
 +- TokenNotFound                NOT_FOUND            TOKEN_NOT_FOUND (none live for request_id)
 +- PermissionDenied             PERMISSION_DENIED    PERMISSION_DENIED
 +- RateLimited                  RESOURCE_EXHAUSTED   RATE_LIMITED
 +- InvalidRequest               INVALID_ARGUMENT     INVALID_REQUEST (malformed ids or fields)
 +- DeadlineExceeded             DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
 +- Withdrawn                    CANCELLED            WITHDRAWN (dropped unsent, on request)
 +- Unavailable                  UNAVAILABLE          UNAVAILABLE (a peer relay service; retryable)
 |   +- OutcomeUnknown           UNAVAILABLE          OUTCOME_UNKNOWN (sent, no answer yet; resend)
 +- FlexError                    INTERNAL             FLEX_ERROR
 |   +- FlexRejected             FAILED_PRECONDITION  FLEX_REJECTED (+ flex_reason, 4xx)
 |   +- FlexAuthFailed           FAILED_PRECONDITION  FLEX_AUTH_FAILED (401 from the gateway)
 |   +- FlexUnavailable          UNAVAILABLE          FLEX_UNAVAILABLE (5xx, 429, network)
 |   +- FlexResponseInvalid      UNAVAILABLE          FLEX_RESPONSE_INVALID (bad body or Digest)
 +- PublicKeyNotFound            INVALID_ARGUMENT     PUBLIC_KEY_NOT_FOUND
 +- ReceiptInvalid               INVALID_ARGUMENT     RECEIPT_INVALID (a release receipt failed)
 +- ConfigError                  startup only: a message and exit code 2, never on the wire

Messages are fixed text plus ids (card_ref, kid, request_id), never values: an exception text
may end up in a log line or a gRPC status, so it must never carry card data.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = False
    by_reason: ClassVar[dict[str, type[RelayError]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Register each class by its reason, so a client can re-raise what a server raised."""
        super().__init_subclass__(**kwargs)
        RelayError.by_reason.setdefault(cls.reason, cls)

    def __init__(self, message: str, **ids: str) -> None:
        """Keep the message and the ids (never card data) that locate the problem."""
        super().__init__(message)
        self.message = message
        self.ids = dict(ids)

    @classmethod
    def from_wire(cls, message: str, ids: dict[str, str]) -> RelayError:
        """Rebuild an error received from a peer (gRPC status or a pb Error)."""
        return cls(message, **ids)


RelayError.by_reason[RelayError.reason] = RelayError


class CaptureContextInvalid(RelayError):
    """The capture context failed a check: signature, alg, claims, origin or size."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "CAPTURE_CONTEXT_INVALID"


class CaptureContextExpired(CaptureContextInvalid):
    """The capture context's exp has passed: create a new session."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CAPTURE_CONTEXT_EXPIRED"
    retryable = True


class CaptureContextReused(RelayError):
    """The capture context was already used for another release: create a new session.

    Not a CaptureContextInvalid: the context is genuine, and a retry under a new one succeeds.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CAPTURE_CONTEXT_REUSED"


class TransientTokenInvalid(RelayError):
    """The transient token Flex returned failed verification against its capture context."""

    reason = "TRANSIENT_TOKEN_INVALID"


class TokenExpired(TransientTokenInvalid):
    """The transient token's 15 minutes are over."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TOKEN_EXPIRED"


class InvalidCardData(RelayError):
    """A card value failed validation (Luhn, length, expiry). The value itself is never named."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_CARD_DATA"


class InvalidFieldSpec(RelayError):
    """A requested Flex field path is unknown, or the spec is malformed."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD_SPEC"


class MissingRequiredField(RelayError):
    """The card lacks a field the capture context requires; nothing was sent to Flex."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MISSING_REQUIRED_FIELD"


class CardNotFound(RelayError):
    """No card with this card_ref is available to the caller."""

    status = grpc.StatusCode.NOT_FOUND
    reason = "CARD_NOT_FOUND"


class NotGranted(CardNotFound):
    """The card exists but is not granted to the caller. Answers exactly as CardNotFound."""


class TokenNotFound(RelayError):
    """No live transient token is recorded under this request_id."""

    status = grpc.StatusCode.NOT_FOUND
    reason = "TOKEN_NOT_FOUND"


class PermissionDenied(RelayError):
    """The caller's identity could not be established or is not allowed at all."""

    status = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class RateLimited(RelayError):
    """The caller exceeded its request rate; retry later."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"
    retryable = True


class InvalidRequest(RelayError):
    """A request field (request_id, card_ref, capture context) is missing or malformed."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class DeadlineExceeded(RelayError):
    """The caller's deadline passed before the work finished."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"
    retryable = True


class Withdrawn(RelayError):
    """The caller withdrew the item before anything was sent to Flex; nothing was tokenized."""

    status = grpc.StatusCode.CANCELLED
    reason = "WITHDRAWN"
    retryable = True


class Unavailable(RelayError):
    """A peer relay service could not be reached or is draining; the call may be retried."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"
    retryable = True


class OutcomeUnknown(Unavailable):
    """The request was sent and its answer is not known yet: send the same request_id again.

    The ledger keeps the request's capture context, so the repeat asks after that same attempt
    and gets its token if there was one: it is never tokenized twice.
    """

    reason = "OUTCOME_UNKNOWN"


class FlexError(RelayError):
    """Flex API answered something the relay cannot use."""

    reason = "FLEX_ERROR"

    @classmethod
    def from_wire(cls, message: str, ids: dict[str, str]) -> RelayError:
        """Keep the Flex reason, which travels as the flex_reason id."""
        rest: dict[str, Any] = {k: v for k, v in ids.items() if k != "flex_reason"}
        return cls(message, flex_reason=ids.get("flex_reason", ""), **rest)

    def __init__(
        self, message: str, *, http_status: int = 0, flex_reason: str = "", **ids: str
    ) -> None:
        """Keep the HTTP status and Flex's own reason code next to the message."""
        super().__init__(message, **ids)
        self.http_status = http_status
        self.flex_reason = flex_reason
        if flex_reason:
            self.ids["flex_reason"] = flex_reason


class FlexRejected(FlexError):
    """Flex refused the request (4xx with a responseStatus envelope)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FLEX_REJECTED"


class FlexAuthFailed(FlexError):
    """The Flex gateway refused our credentials (401): check merchant id, key id and secret."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FLEX_AUTH_FAILED"


class FlexUnavailable(FlexError):
    """Flex could not be reached or answered 5xx/429; the call may be retried."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "FLEX_UNAVAILABLE"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        http_status: int = 0,
        flex_reason: str = "",
        retry_after: float | None = None,
        **ids: str,
    ) -> None:
        """Also keep a Retry-After hint (seconds) when Flex sent one."""
        super().__init__(message, http_status=http_status, flex_reason=flex_reason, **ids)
        self.retry_after = retry_after


class FlexResponseInvalid(FlexError):
    """Flex answered 2xx with a body or Digest that does not check out."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "FLEX_RESPONSE_INVALID"


class PublicKeyNotFound(RelayError):
    """Flex does not know the kid a capture context names."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "PUBLIC_KEY_NOT_FOUND"


class ReceiptInvalid(RelayError):
    """A release receipt failed verification: alg, signature, key, claims or token hash."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "RECEIPT_INVALID"


class ConfigError(RelayError):
    """Settings are missing or malformed. Raised at start-up only, never sent on the wire."""

    reason = "CONFIG_ERROR"

    def __init__(self, problems: list[str]) -> None:
        """Collect every problem (variable names, never values) into one error."""
        super().__init__("invalid configuration: " + "; ".join(problems))
        self.problems = list(problems)
