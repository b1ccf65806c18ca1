"""The tokenization engine: one request from capture context to verified transient token.

Order matters: the rate limit first, then the capture context (signature, claims, origin),
then the card (grant check and decryption), then encryption of exactly the requested fields,
the POST to Flex, and verification of what Flex returned. Every attempt, success or failure,
is written to the audit chain before the caller hears the outcome.
"""

from __future__ import annotations

import dataclasses
import re
import time

import structlog

from pci_side.ratelimit import RateLimiter
from pci_side.vault import AuditEntry, CardVault
from relay.errors import InvalidRequest, NotGranted, RelayError
from relay.flex.client import FlexClient

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
        """Tokenize one card for one merchant, auditing the attempt whatever happens."""
        _validate(request)
        with structlog.contextvars.bound_contextvars(
            request_id=request.request_id, merchant=merchant_id, card_ref=request.card_ref
        ):
            started = time.perf_counter()
            entry = AuditEntry(merchant_id, request.card_ref, request.request_id, "", "", "", "")
            try:
                issued, entry = await self._tokenize(merchant_id, request, entry)
            except RelayError as exc:
                reason = "NOT_GRANTED" if isinstance(exc, NotGranted) else exc.reason
                await self._vault.record_attempt(
                    dataclasses.replace(entry, outcome="failure", reason=reason)
                )
                _log.info("tokenize_failed", reason=reason, ms=_ms(started))
                raise
            await self._vault.record_attempt(dataclasses.replace(entry, outcome="success"))
            _log.info("tokenized", tt_jti=issued.jti, ms=_ms(started))
            return issued

    async def _tokenize(
        self, merchant_id: str, request: TokenizeRequest, entry: AuditEntry
    ) -> tuple[IssuedToken, AuditEntry]:
        self._limiter.acquire(merchant_id)
        ctx = await self._flex.verify_capture_context(request.capture_context)
        entry = dataclasses.replace(entry, cc_jti=ctx.jti)
        card = await self._vault.load_card(request.card_ref, merchant_id)
        jwe = self._flex.encrypt_card(ctx, card)
        del card  # the clear card lives no longer than the encryption
        token = self._flex.verify_transient_token(await self._flex.post_token(ctx, jwe), ctx)
        entry = dataclasses.replace(entry, tt_jti=token.jti)
        return IssuedToken(request.request_id, token.raw, token.jti, token.expires_at), entry


def _validate(request: TokenizeRequest) -> None:
    if not _REQUEST_ID.fullmatch(request.request_id):
        raise InvalidRequest("request_id must be 1-128 printable ASCII characters")
    if not _ID.fullmatch(request.card_ref):
        raise InvalidRequest("card_ref is missing or malformed", request_id=request.request_id)
    if not request.capture_context:
        raise InvalidRequest("capture_context is missing", request_id=request.request_id)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
