"""The merchant side's flow: session, PciRelay, token verification, ledger.

The capture context is verified here before PciRelay sees it, and the transient token is
verified against the one-time key of the context we created, so a PciRelay (or a network) that
returns someone else's token is caught. A request_id is tokenized at most once while its token
lives (the ledger), and a context that expired in transit or a PciRelay that is unavailable
costs a fresh session, within the caller's deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from merchant_side.ledger import Ledger, TokenRecord
from merchant_side.pci_client import PciToken
from relay.config import MerchantConfig
from relay.errors import (
    CaptureContextExpired,
    DeadlineExceeded,
    FlexUnavailable,
    InvalidRequest,
    TokenNotFound,
    Unavailable,
)
from relay.flex.client import FlexClient
from relay.flex.fields import DEFAULT_FIELDS, FieldSpec, validate_fields
from relay.flex.models import CaptureContext
from relay.logging import looks_like_card_number

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_RECOVERABLE = (CaptureContextExpired, Unavailable, FlexUnavailable)
_log = structlog.get_logger("merchant_side.gateway")

Tokenize = Callable[[str, str, str, float], Awaitable[PciToken]]
"""(request_id, capture_context, card_ref, seconds left) -> the token PciRelay returned."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRequest:
    """One card to tokenize, named by the caller's request_id for idempotency."""

    request_id: str
    card_ref: str
    fields: tuple[FieldSpec, ...] = ()


class Gateway:
    """Sessions, tokenization with recovery, and the idempotency ledger."""

    def __init__(
        self,
        flex: FlexClient,
        ledger: Ledger,
        config: MerchantConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Share one Flex client and one ledger; clock measures deadlines."""
        self._flex = flex
        self._ledger = ledger
        self._config = config
        self._clock = clock

    async def create_session(self, fields: Sequence[FieldSpec] = ()) -> CaptureContext:
        """A fresh capture context for these fields (default: number + optional card fields)."""
        spec = validate_fields(fields or DEFAULT_FIELDS)
        return await self._flex.verify_capture_context(await self._flex.create_session(spec))

    async def request_token(
        self, request: TokenRequest, tokenize: Tokenize, *, deadline: float | None
    ) -> TokenRecord:
        """The recorded token for request_id, or a new one made exactly once."""
        _validate(request)
        validate_fields(request.fields or DEFAULT_FIELDS)
        until = self._clock() + (
            deadline if deadline is not None else self._config.default_deadline
        )
        with structlog.contextvars.bound_contextvars(
            request_id=request.request_id, card_ref=request.card_ref
        ):
            left = self._left(until)
            claim = await self._ledger.claim(
                request.request_id, request.card_ref, lease_seconds=left, wait_seconds=left
            )
            if claim.record is not None:
                _log.info("token_replayed", tt_jti=claim.record.jti)
                return claim.record
            try:
                record = await self._tokenize(request, tokenize, until)
            except BaseException:
                await asyncio.shield(self._ledger.abandon(request.request_id))
                raise
            await self._ledger.complete(record)
            _log.info("token_issued", tt_jti=record.jti)
            return record

    async def get_token(self, request_id: str) -> TokenRecord:
        """The live token recorded under request_id."""
        record = await self._ledger.get(request_id)
        if record is None:
            raise TokenNotFound("no live token for this request_id", request_id=request_id)
        return record

    async def _tokenize(
        self, request: TokenRequest, tokenize: Tokenize, until: float
    ) -> TokenRecord:
        attempts = self._config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                ctx = await self.create_session(request.fields)
                token = await tokenize(
                    request.request_id, ctx.raw, request.card_ref, self._left(until)
                )
            except _RECOVERABLE as exc:
                if attempt == attempts or self._left(until) <= 0:
                    raise
                _log.info("token_retry", reason=exc.reason, attempt=attempt)
                # Full jitter, so a PciRelay outage is not met with a burst of Flex sessions.
                delay = random.uniform(0, min(1.0, 0.05 * 2**attempt))  # noqa: S311  not crypto
                await asyncio.sleep(min(delay, max(0.0, until - self._clock())))
                continue
            return self._record(request, token, ctx)
        raise AssertionError("unreachable: max_attempts is at least 1")

    def _record(self, request: TokenRequest, token: PciToken, ctx: CaptureContext) -> TokenRecord:
        verified = self._flex.verify_transient_token(token.transient_token, ctx)
        return TokenRecord(
            request_id=request.request_id,
            card_ref=request.card_ref,
            transient_token=verified.raw,
            jti=verified.jti,
            expires_at=verified.expires_at,
            masked_pan=verified.masked_pan,
            bin=verified.bin,
            card_type=verified.card_type,
        )

    def _left(self, until: float) -> float:
        left = until - self._clock()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        return left


def _validate(request: TokenRequest) -> None:
    if not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidRequest("request_id must be 1-128 printable ASCII characters")
    if looks_like_card_number(request.request_id) or looks_like_card_number(request.card_ref):
        # Ids are recorded and echoed in clear: never with a card number in them.
        raise InvalidRequest("request_id and card_ref must not contain a card number")
    if not _ID.fullmatch(request.card_ref):
        raise InvalidRequest("card_ref is missing or malformed", request_id=request.request_id)
