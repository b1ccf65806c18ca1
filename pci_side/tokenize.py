"""The tokenization engine: one request from capture context to verified transient token.

Order matters: the rate limit first, then the capture context (signature, claims, origin),
then the card (grant check and decryption), then encryption of exactly the requested fields,
the POST to Flex, and verification of what Flex returned. Every attempt, success or failure,
is written to the audit chain before the caller hears the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

import structlog

from pci_side.ratelimit import RateLimiter
from pci_side.vault import AuditEntry, CardVault
from relay.errors import DeadlineExceeded, InvalidRequest, NotGranted, RelayError
from relay.flex.client import FlexClient
from relay.logging import looks_like_card_number

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_log = structlog.get_logger("pci_side.tokenize")


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """What the merchant side asks for: a card, under a capture context it created."""

    request_id: str
    capture_context: str = dataclasses.field(repr=False)
    card_ref: str


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedToken:
    """A verified transient token for the merchant side."""

    request_id: str
    token: str = dataclasses.field(repr=False)
    jti: str
    expires_at: int


class Tokenizer:
    """Runs tokenization requests against the vault and Flex."""

    def __init__(self, vault: CardVault, flex: FlexClient, limiter: RateLimiter) -> None:
        """Share one vault, one Flex client and one rate limiter across all calls."""
        self._vault = vault
        self._flex = flex
        self._limiter = limiter

    async def tokenize(self, merchant_id: str, request: TokenizeRequest) -> IssuedToken:
        """Tokenize one card for one merchant, auditing the attempt whatever happens.

        A cancelled call (deadline, client gone) is audited too, as DEADLINE_EXCEEDED: the
        card may already have been sent to Flex, and the audit chain must say so.
        """
        _validate(request)
        with structlog.contextvars.bound_contextvars(
            request_id=request.request_id, merchant=merchant_id, card_ref=request.card_ref
        ):
            started = time.perf_counter()
            attempt = _Attempt(
                AuditEntry(merchant_id, request.card_ref, request.request_id, "", "", "", "")
            )
            try:
                issued = await self._tokenize(merchant_id, request, attempt)
            except RelayError as exc:
                reason = "NOT_GRANTED" if isinstance(exc, NotGranted) else exc.reason
                await self._audit(attempt, "failure", reason)
                _log.info("tokenize_failed", reason=reason, ms=_ms(started))
                raise
            except asyncio.CancelledError:
                await asyncio.shield(self._audit(attempt, "failure", DeadlineExceeded.reason))
                _log.info("tokenize_cancelled", ms=_ms(started))
                raise
            except Exception:
                # Anything unexpected is still an attempt the audit chain must record.
                await self._audit(attempt, "failure", "INTERNAL")
                raise
            await self._audit(attempt, "success", "")
            _log.info("tokenized", tt_jti=issued.jti, ms=_ms(started))
            return issued

    async def _audit(self, attempt: _Attempt, outcome: str, reason: str) -> None:
        await self._vault.record_attempt(
            dataclasses.replace(attempt.entry, outcome=outcome, reason=reason)
        )

    async def _tokenize(
        self, merchant_id: str, request: TokenizeRequest, attempt: _Attempt
    ) -> IssuedToken:
        self._limiter.acquire(merchant_id)
        ctx = await self._flex.verify_capture_context(request.capture_context)
        attempt.entry = dataclasses.replace(attempt.entry, cc_jti=ctx.jti)
        card = await self._vault.load_card(request.card_ref, merchant_id)
        jwe = self._flex.encrypt_card(ctx, card)
        del card  # the clear card lives no longer than the encryption
        token = self._flex.verify_transient_token(await self._flex.post_token(ctx, jwe), ctx)
        attempt.entry = dataclasses.replace(attempt.entry, tt_jti=token.jti)
        return IssuedToken(request.request_id, token.raw, token.jti, token.expires_at)


@dataclasses.dataclass(slots=True)
class _Attempt:
    """What the audit record will say, filled in as the steps succeed."""

    entry: AuditEntry


def _validate(request: TokenizeRequest) -> None:
    if not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidRequest("request_id must be 1-128 printable ASCII characters")
    if looks_like_card_number(request.request_id) or looks_like_card_number(request.card_ref):
        # Ids are stored and echoed in clear (audit, statuses): never with a card number in them.
        raise InvalidRequest("request_id and card_ref must not contain a card number")
    if not _ID.fullmatch(request.card_ref):
        raise InvalidRequest("card_ref is missing or malformed", request_id=request.request_id)
    if not request.capture_context:
        raise InvalidRequest("capture_context is missing", request_id=request.request_id)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
