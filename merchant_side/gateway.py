"""The merchant side's flow: session, PciRelay, token verification, ledger.

The capture context is verified here before PciRelay sees it, and the transient token is
verified against the one-time key of the context we created, so a PciRelay (or a network) that
returns someone else's token is caught.

Requests are the calling app's own: (app_id, request_id) names one in the ledger and at
PciRelay, so apps never see each other's requests or tokens. A request is tokenized at most
once, whatever the caller does:

- it is claimed in the ledger with a short lease, renewed while the work runs, so a replica
  that dies hands its ids to another within one lease, not after the caller's deadline;
- the capture context of each attempt is noted in the ledger before it goes to PciRelay, and a
  repeat (after an unanswered attempt, or a takeover of a lapsed lease) goes out under that same
  context, which PciRelay answers with the first attempt's token instead of a second one;
- the work is detached from its caller: a caller that leaves (cancelled, deadline) withdraws
  the request at PciRelay, and an answer already on its way is still recorded, so the caller's
  retry gets that token; a claim is released only once nothing can come of it;
- a context that expired, or a PciRelay that is unavailable or restarting, costs another try
  with jittered backoff, for as long as the caller's deadline allows; a context PciRelay will
  not release a card under again (used by another request, or its attempt failed at Flex)
  costs a new session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

import structlog

from merchant_side.ledger import Ledger, TokenRecord
from merchant_side.pci_client import PciLink, PciToken
from relay.config import MerchantConfig
from relay.errors import (
    CaptureContextExpired,
    CaptureContextInvalid,
    CaptureContextReused,
    DeadlineExceeded,
    FlexUnavailable,
    OutcomeUnknown,
    RelayError,
    TokenNotFound,
    Unavailable,
    Withdrawn,
)
from relay.flex.client import FlexClient
from relay.flex.fields import DEFAULT_FIELDS, FieldSpec, validate_fields
from relay.flex.models import CaptureContext
from relay.ids import check_card_ref, check_request_id

_RECOVERABLE = (CaptureContextExpired, Unavailable, FlexUnavailable, Withdrawn)
_SPENT = (CaptureContextReused, FlexUnavailable)
"""Answers after which a capture context cannot go out again (PciRelay releases a card once
per context, and answers its failure to a repeat): the next try takes a new session."""
_log = structlog.get_logger("merchant_side.gateway")

LEASE_SECONDS: Final = 5.0
"""A claim's lease: renewed every third of it while the work runs; what a takeover waits."""
ANSWER_MARGIN_SECONDS: Final = 0.25
"""Kept from the caller's deadline to answer it, after the last try."""
MIN_CONTEXT_LIFE_SECONDS: Final = 30.0
"""A capture context closer than this to its expiry is not sent again: a new session is."""
MAX_BACKOFF_SECONDS: Final = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRequest:
    """One card to tokenize, named by the calling app's request_id for idempotency."""

    request_id: str
    card_ref: str
    fields: tuple[FieldSpec, ...] = ()
    app_id: str = dataclasses.field(kw_only=True)
    """The calling app (merchant_side.identity): the namespace of request_id."""


@dataclasses.dataclass(frozen=True, slots=True)
class Pacing:
    """How claims are leased and retries spaced (injectable, so tests need not wait)."""

    lease_seconds: float = LEASE_SECONDS
    sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    """A uniform draw in [0, 1): full jitter, so an outage is not met with bursts of retries."""


@dataclasses.dataclass(slots=True)
class _Job:
    """One claimed request: where it goes, until when, and whether its caller is still there."""

    request: TokenRequest
    link: PciLink
    until: float
    previous_attempt: str | None
    caller_left: bool = False
    sent: set[str] = dataclasses.field(default_factory=set)
    """The jtis of the contexts this job has sent (the noted previous_attempt counts too)."""
    unknown: bool = False
    """Some attempt of this request (or of an earlier holder's) may have been tokenized unseen:
    the claim must then be left to a retry, never abandoned."""


class _LeaseLost(Exception):
    """Another holder took the claim over: the request is theirs now; touch nothing."""


class Gateway:
    """Sessions, tokenization with recovery, and the idempotency ledger."""

    def __init__(
        self,
        flex: FlexClient,
        ledger: Ledger,
        config: MerchantConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        pacing: Pacing | None = None,
    ) -> None:
        """Share one Flex client and one ledger; clock measures deadlines."""
        self._flex = flex
        self._ledger = ledger
        self._config = config
        self._clock = clock
        self._pacing = pacing if pacing is not None else Pacing()
        self._work: set[asyncio.Task[Any]] = set()

    @property
    def default_deadline(self) -> float:
        """Seconds a request may take when its caller set no deadline."""
        return self._config.default_deadline

    async def create_session(self, fields: Sequence[FieldSpec] = ()) -> CaptureContext:
        """A fresh capture context for these fields (default: number + optional card fields)."""
        spec = validate_fields(fields or DEFAULT_FIELDS)
        return await self._flex.verify_capture_context(await self._flex.create_session(spec))

    async def request_token(
        self, request: TokenRequest, link: PciLink, *, deadline: float | None
    ) -> TokenRecord:
        """The recorded token for request_id, or a new one made exactly once."""
        _validate(request)
        validate_fields(request.fields or DEFAULT_FIELDS)
        seconds = deadline if deadline is not None else self._config.default_deadline
        until = self._clock() + seconds
        with structlog.contextvars.bound_contextvars(
            app_id=request.app_id, request_id=request.request_id, card_ref=request.card_ref
        ):
            claim = await self._ledger.claim(
                request.app_id,
                request.request_id,
                request.card_ref,
                lease_seconds=self._pacing.lease_seconds,
                wait_seconds=self._left(until),
            )
            if claim.record is not None:
                _log.info("token_replayed", tt_jti=claim.record.jti)
                return claim.record
            previous = claim.previous_attempt
            job = _Job(request, link, until, previous, unknown=previous is not None)
            work = self.detach(self._own(job))
            try:
                async with asyncio.timeout(self._left(until)):
                    return await asyncio.shield(work)
            except TimeoutError:
                self._caller_left(job)
                raise DeadlineExceeded("the request's deadline passed") from None
            except asyncio.CancelledError:
                self._caller_left(job)
                raise

    async def get_token(self, app_id: str, request_id: str) -> TokenRecord:
        """The live token app_id recorded under request_id.

        Another app's request_id answers exactly as an unknown one: no oracle across apps.
        """
        record = await self._ledger.get(app_id, request_id)
        if record is None:
            raise TokenNotFound("no live token for this request_id", request_id=request_id)
        return record

    def detach(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work beyond its caller; `wait_idle` waits for it before the ledger closes."""
        task = asyncio.create_task(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        task.add_done_callback(_seen)
        return task

    async def wait_idle(self, timeout: float) -> None:
        """Wait (at shutdown, after the drain) for detached work, then cancel what is left.

        Work cancelled with a request in flight at PciRelay leaves its claim, with its capture
        context, to a retry (see _release), so stopping never costs a second tokenization.
        """
        if self._work:
            await asyncio.wait(set(self._work), timeout=timeout)
        for task in list(self._work):
            task.cancel()
        if self._work:
            await asyncio.wait(set(self._work))

    def _caller_left(self, job: _Job) -> None:
        job.caller_left = True
        job.link.withdraw(job.request.app_id, job.request.request_id)
        _log.info("token_caller_left")

    async def _own(self, job: _Job) -> TokenRecord:
        """Hold the claim while the job runs; record, release or leave it as the outcome says."""
        request_id = job.request.request_id
        keeper = asyncio.create_task(
            self._keep_lease(job.request.app_id, request_id), name="ledger-lease"
        )
        try:
            record = await self._attempts(job)
        except _LeaseLost:
            raise Unavailable(
                "another gateway replica took this request over", request_id=request_id
            ) from None
        except BaseException:
            await asyncio.shield(self._release(job))
            raise
        finally:
            keeper.cancel()
        await self._ledger.complete(record)
        _log.info("token_issued", tt_jti=record.jti, late=job.caller_left)
        return record

    async def _release(self, job: _Job) -> None:
        app_id, request_id = job.request.app_id, job.request.request_id
        if job.unknown:
            # PciRelay may have tokenized it: leave the claim, with its context, to the retry.
            await self._ledger.renew(app_id, request_id, 0.0)
            _log.info("token_outcome_unknown")
        else:
            await self._ledger.abandon(app_id, request_id)

    async def _keep_lease(self, app_id: str, request_id: str) -> None:
        while True:
            await asyncio.sleep(self._pacing.lease_seconds / 3)
            try:
                held = await self._ledger.renew(app_id, request_id, self._pacing.lease_seconds)
            except RelayError as exc:
                _log.warning("ledger_renew_failed", reason=exc.reason)
                continue
            if not held:
                _log.warning("ledger_lease_lost")
                return

    async def _attempts(self, job: _Job) -> TokenRecord:
        """Try until a token, a definite refusal, the caller leaving, or the deadline."""
        ctx: CaptureContext | None = None
        last: RelayError
        for attempt in itertools.count(1):
            try:
                ctx = await self._context_for(job, ctx)
                return await self._attempt(job, ctx)
            except CaptureContextExpired as exc:
                if job.unknown:  # PciRelay has no kept answer for it: only a later retry may
                    raise _unknown(job) from None
                ctx, last = None, exc
            except _SPENT as exc:
                job.unknown = False  # a definite answer: no token was released under ctx
                ctx, last = None, exc
            except _RECOVERABLE as exc:
                last = exc
            wait = self._pacing.jitter() * min(MAX_BACKOFF_SECONDS, 0.05 * 2 ** min(attempt, 10))
            if job.caller_left or self._clock() + wait >= job.until - ANSWER_MARGIN_SECONDS:
                raise _unknown(job) if job.unknown else last
            _log.info("token_retry", reason=last.reason, attempt=attempt)
            await self._pacing.sleep(wait)
        raise AssertionError("unreachable")

    async def _attempt(self, job: _Job, ctx: CaptureContext) -> TokenRecord:
        request = job.request
        left = self._left(job.until) - ANSWER_MARGIN_SECONDS
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        if not await self._ledger.note_attempt(request.app_id, request.request_id, ctx.raw):
            raise _LeaseLost
        if job.caller_left:  # checked last: nothing goes out for a caller who has left
            raise Withdrawn("the caller left", request_id=request.request_id)
        repeat = ctx.jti in job.sent or ctx.raw == job.previous_attempt
        job.sent.add(ctx.jti)
        try:
            token = await job.link.tokenize(
                request.app_id,
                request.request_id,
                ctx.raw,
                request.card_ref,
                timeout=left,
                repeat=repeat,
            )
        except RelayError as exc:
            job.unknown = job.unknown or isinstance(exc, OutcomeUnknown)
            raise
        except BaseException:
            job.unknown = True  # stopped while PciRelay had it: its outcome is not ours to know
            raise
        return self._record(request, token, ctx)

    async def _context_for(self, job: _Job, ctx: CaptureContext | None) -> CaptureContext:
        """The context to send: a live one, or the noted one while its outcome is unknown.

        PciRelay answers a repeat under the noted context with that attempt's result; any other
        context could tokenize a second time.
        """
        if job.caller_left:
            raise Withdrawn("the caller left", request_id=job.request.request_id)
        if job.unknown:
            if ctx is not None:
                return ctx
            assert job.previous_attempt is not None  # unknown from the start means taken over
            try:
                return await self._flex.verify_capture_context(
                    job.previous_attempt, ignore_expiry=True
                )
            except CaptureContextInvalid:
                raise _unknown(job) from None
        if ctx is not None and ctx.expires_at - time.time() > MIN_CONTEXT_LIFE_SECONDS:
            return ctx
        return await self.create_session(job.request.fields)

    def _record(self, request: TokenRequest, token: PciToken, ctx: CaptureContext) -> TokenRecord:
        verified = self._flex.verify_transient_token(token.transient_token, ctx)
        return TokenRecord(
            app_id=request.app_id,
            request_id=request.request_id,
            card_ref=request.card_ref,
            transient_token=verified.raw,
            jti=verified.jti,
            expires_at=verified.expires_at,
            masked_pan=verified.masked_pan,
            bin=verified.bin,
            card_type=verified.card_type,
            receipt=token.receipt,  # the app verifies it: the gateway only passes it on
        )

    def _left(self, until: float) -> float:
        left = until - self._clock()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        return left


def _unknown(job: _Job) -> OutcomeUnknown:
    return OutcomeUnknown(
        "the outcome is not known yet: send the same request_id again, it is never tokenized twice",
        request_id=job.request.request_id,
    )


def _seen(task: asyncio.Task[Any]) -> None:
    """Mark a detached task's failure as seen: its caller may have left, and it was logged."""
    if not task.cancelled():
        task.exception()


def _validate(request: TokenRequest) -> None:
    # relay.ids: the rules PciRelay applies too; ids are recorded and echoed in clear.
    check_request_id(request.request_id)
    check_card_ref(request.card_ref, request_id=request.request_id)
