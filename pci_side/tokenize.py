"""The tokenization engine: one request from capture context to verified transient token.

Order matters: the rate limit first (shared by every replica on a PostgreSQL vault), then the
capture context (signature, claims, origin) and its single use, then the card (grant check and
decryption), then encryption of exactly the requested fields, the POST to Flex, and
verification of what Flex returned.

One capture context releases at most one card: its jti is claimed in the vault, atomically
across replicas, before the card is read, for one request (merchant, app, request_id,
card_ref). Any other request under it is refused (CAPTURE_CONTEXT_REUSED, audited). A claim
whose card was never sent is given back; after the card was sent it stays, and the request
itself asking again gets the kept token, the attempt's failure, or, while neither is known,
OUTCOME_UNKNOWN (ask again), never a second release.

The audit chain is written ahead: a refusal before Flex is one record; an attempt that goes to
Flex is a `started` record, committed before the card leaves, and then its outcome. A crash
between the two leaves the `started` record as evidence (`relay cards audit unfinished`).

Once the card is on its way to Flex the attempt is not abandoned: a caller that leaves, a
withdrawal or a deadline stops an attempt only before that point. After it, the attempt runs
to its end, is audited, and its result is kept (releases.py) so the merchant side, asking
again under the same capture context, gets the same token instead of a second tokenization.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import time

import structlog

from pci_side.presence import Presence, holder_alive, instance_of, new_instance_id
from pci_side.releases import Release, ReleaseKey, Releases
from pci_side.vault import AuditEntry, CardVault, ContextUse, Released
from relay.errors import (
    CaptureContextExpired,
    CaptureContextReused,
    DeadlineExceeded,
    InvalidRequest,
    NotGranted,
    OutcomeUnknown,
    RelayError,
    Unavailable,
    Withdrawn,
)
from relay.flex.client import FlexClient
from relay.flex.models import CaptureContext
from relay.ids import IdKind, check_app_id, check_card_ref, check_request_id, is_valid_id
from relay.ratelimit import Rate
from relay.receipts import Receipt, ReceiptSigner, token_sha256

_log = structlog.get_logger("pci_side.tokenize")


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """What the merchant side asks for: a card, under a capture context it created."""

    request_id: str
    capture_context: str = dataclasses.field(repr=False)
    card_ref: str
    send_by: float | None = None
    """Event-loop time after which the card must not be sent to Flex any more; None: no limit."""
    repeat: bool = False
    """Sent before under this context without an answer: look for it in the vault too."""
    app_id: str = ""
    """The merchant's app that asked: request ids are per app."""


@dataclasses.dataclass(frozen=True, slots=True)
class IssuedToken:
    """A verified transient token for the merchant side."""

    request_id: str
    token: str = dataclasses.field(repr=False)
    jti: str
    expires_at: int
    receipt: str = dataclasses.field(repr=False)
    """PciRelay's signed receipt for this release (relay.receipts); "" only inside the engine,
    for a kept release read back from the vault before _replay signs it again."""


@dataclasses.dataclass(slots=True)
class Progress:
    """How far one attempt got; `sent` turns True just before the card goes to Flex."""

    sent: bool = False


class Tokenizer:
    """Runs tokenization requests against the vault and Flex."""

    def __init__(  # noqa: PLR0913  the shared parts, then keyword-only knobs
        self,
        vault: CardVault,
        flex: FlexClient,
        limit: Rate,
        *,
        receipts: ReceiptSigner,
        releases: Releases[IssuedToken] | None = None,
        presence: Presence | None = None,
    ) -> None:
        """Share one vault, one Flex client, one release map; limit is per merchant.

        receipts signs a receipt for every token released or replayed: required, so no
        release leaves unsigned.
        """
        self._receipts = receipts
        self._vault = vault
        self._flex = flex
        self._limit = limit
        self._presence = presence
        self.instance_id = presence.instance_id if presence is not None else new_instance_id()
        """This process, as the holder of the contexts it claims (presence.py beats for it)."""
        self._attempt_numbers = itertools.count(1)
        self._releases: Releases[IssuedToken] = releases if releases is not None else Releases()
        self._sending: set[asyncio.Task[IssuedToken]] = set()

    async def tokenize(
        self, merchant_id: str, request: TokenizeRequest, progress: Progress | None = None
    ) -> IssuedToken:
        """Tokenize one card for one merchant, auditing the attempt whatever happens.

        Stopped before the card was sent (cancelled, or past request.send_by), the attempt is
        audited as WITHDRAWN or DEADLINE_EXCEEDED and nothing reached Flex. Cancelled after, it
        goes on to its end in the background (see `drain`) and its result is kept for a repeat.
        """
        progress = progress if progress is not None else Progress()
        # Ids are logged and audited only once they pass the id rules (they may hold anything).
        request_id = _shown("request_id", request.request_id)
        card_ref = _shown("card_ref", request.card_ref)
        with structlog.contextvars.bound_contextvars(
            request_id=request_id, merchant=merchant_id, card_ref=card_ref
        ):
            started = time.perf_counter()
            # The app that asked is the actor of a tokenization record.
            app_id = _shown("app_id", request.app_id)
            attempt = _Attempt(
                AuditEntry(merchant_id, card_ref, request_id, "", "", "", "", actor=app_id)
            )
            try:
                _validate(request)
                issued = await self._tokenize(merchant_id, request, attempt, progress)
            except RelayError as exc:
                if not progress.sent:
                    reason = "NOT_GRANTED" if isinstance(exc, NotGranted) else exc.reason
                    await self._unsent(attempt, reason)
                    _log.info("tokenize_failed", reason=reason, ms=_ms(started))
                raise
            except asyncio.CancelledError:
                if not progress.sent:
                    reason = _why_stopped(request)
                    await asyncio.shield(self._unsent(attempt, reason))
                    _log.info("tokenize_stopped", reason=reason, ms=_ms(started))
                raise
            except Exception:
                if not progress.sent:
                    # Anything unexpected is still an attempt the audit chain must record.
                    await self._unsent(attempt, "INTERNAL")
                raise
            return issued

    async def drain(self) -> None:
        """Wait for the attempts whose card is already on its way to Flex (before closing)."""
        while self._sending:
            await asyncio.wait(set(self._sending))

    async def _unsent(self, attempt: _Attempt, reason: str) -> None:
        """An attempt that ended before its card was sent: audited, its context given back."""
        try:
            await self._audit(attempt, "failure", reason)
        finally:
            if attempt.use is not None:
                await self._vault.unclaim_context(attempt.use)

    async def _audit(
        self, attempt: _Attempt, outcome: str, reason: str, released: Released | None = None
    ) -> None:
        await self._vault.record_attempt(
            dataclasses.replace(attempt.entry, outcome=outcome, reason=reason), released
        )

    async def _tokenize(
        self, merchant_id: str, request: TokenizeRequest, attempt: _Attempt, progress: Progress
    ) -> IssuedToken:
        await self._vault.take_rate_token(merchant_id, self._limit.per_second, self._limit.burst)
        key = ReleaseKey(merchant_id, request.request_id, request.card_ref, request.app_id)
        try:
            async with asyncio.timeout_at(request.send_by):
                ctx = await self._flex.verify_capture_context(request.capture_context)
        except TimeoutError:
            raise _too_late(request) from None
        except CaptureContextExpired as exc:
            # Signed and expired: a repeat may still ask for what its attempt released.
            attempt.entry = dataclasses.replace(attempt.entry, cc_jti=exc.ids.get("jti", ""))
            earlier = await self._earlier(attempt.entry.cc_jti, key, request.repeat)
            if earlier is None:
                raise
            return await self._replay(attempt, earlier)
        attempt.entry = dataclasses.replace(attempt.entry, cc_jti=ctx.jti)
        earlier = await self._earlier(ctx.jti, key, request.repeat)
        if earlier is not None:
            # Not bounded by send_by: nothing new is sent, and the answer is the earlier one's.
            return await self._replay(attempt, earlier)
        # Registered before the first await, so a repeat arriving meanwhile waits for this one.
        release = self._releases.start(ctx.jti, key)
        try:
            await self._claim(merchant_id, request, ctx, attempt)
            jwe = await self._prepare(merchant_id, request, ctx, attempt)
        except BaseException as exc:
            release.fail(exc if isinstance(exc, RelayError) else Withdrawn("stopped unsent"))
            raise
        progress.sent = True
        task = asyncio.create_task(self._send(ctx, jwe, attempt), name="tokenize-send")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        task.add_done_callback(functools.partial(_settle, release))
        return await asyncio.shield(task)

    async def _claim(
        self, merchant_id: str, request: TokenizeRequest, ctx: CaptureContext, attempt: _Attempt
    ) -> None:
        """Make ctx this request's, on every replica; else say why it cannot be used.

        Each attempt holds the context under its own holder id (this process's instance id and
        a counter), so that an attempt's late cleanup never frees a context a later attempt of
        the same request holds.
        """
        use = ContextUse(
            ctx.jti, merchant_id, request.app_id, request.request_id, request.card_ref,
            ctx.expires_at, f"{self.instance_id}/{next(self._attempt_numbers)}",
        )  # fmt: skip
        # Set first: a caller cancelled while the claim is being written still gives it back.
        attempt.use = use
        held = await self._vault.claim_context(use)
        if held is None:
            return
        attempt.use = None
        request_id = request.request_id
        reused = CaptureContextReused(
            "the capture context was already used: create a new session", request_id=request_id
        )
        if not held.same_request(use):
            raise reused
        if held.failed_reason:  # its card was sent and the attempt failed: the context is spent
            if not request.repeat:
                raise reused
            cls = RelayError.by_reason.get(held.failed_reason, RelayError)
            raise cls.from_wire(
                "the attempt under this capture context failed", {"request_id": request_id}
            )
        # No outcome. An attempt of this process would have been found running or kept (in
        # `_earlier`), so one of ours ended unsent (its claim about to be given back); another
        # process's may still finish while that process lives.
        if instance_of(held.holder) != self.instance_id:
            if not request.repeat:
                raise reused
            if await holder_alive(self._vault, held.holder):
                raise _unresolved(request_id)
            _log.warning("tokenize_context_taken_over", cc_jti=ctx.jti, holder=held.holder)
        if not await self._vault.take_over_context(held, use.holder):
            raise _unresolved(request_id)
        attempt.use = use

    async def _prepare(
        self, merchant_id: str, request: TokenizeRequest, ctx: CaptureContext, attempt: _Attempt
    ) -> str:
        """The JWE, once the started record is committed; DeadlineExceeded past send_by."""
        try:
            async with asyncio.timeout_at(request.send_by):
                card = await self._vault.load_card(request.card_ref, merchant_id)
                jwe = self._flex.encrypt_card(ctx, card)
                attempt.held_security_code = card.security_code is not None
                del card  # the clear card lives no longer than the encryption
                if self._presence is not None and not self._presence.may_send():
                    # Others may take this process for dead, and its context for theirs.
                    raise Unavailable("this replica lost touch with the vault: send it again")
                await self._audit(attempt, "started", "")
        except TimeoutError:
            raise _too_late(request) from None
        if request.send_by is not None and asyncio.get_running_loop().time() >= request.send_by:
            raise _too_late(request)
        return jwe

    async def _send(self, ctx: CaptureContext, jwe: str, attempt: _Attempt) -> IssuedToken:
        """POST, verify, audit the outcome: runs to its end even if the caller leaves."""
        started = time.perf_counter()
        try:
            raw = await self._flex.post_token(ctx, jwe)
            token = self._flex.verify_transient_token(raw, ctx)
        except RelayError as exc:
            await self._audit(attempt, "failure", exc.reason)
            await self._vault.fail_context(ctx.jti, exc.reason)
            _log.info("tokenize_failed", reason=exc.reason, ms=_ms(started))
            raise
        except BaseException:
            # Not a definite failure (a crash or a stop mid-POST: Flex may have answered), so
            # the context is not marked failed; the request's repeat is handled as if this
            # process had died with it.
            await asyncio.shield(self._audit(attempt, "failure", "INTERNAL"))
            raise
        attempt.entry = dataclasses.replace(attempt.entry, tt_jti=token.jti)
        entry = attempt.entry
        # Kept with the success record, before the answer leaves: a repeat reaching any replica
        # gets this token back.
        released = Released(
            ctx.jti, entry.merchant_id, entry.request_id, entry.card_ref, token.raw, token.jti,
            token.expires_at,
        )  # fmt: skip
        await self._audit(attempt, "success", "", released)
        if attempt.held_security_code:  # the CVV policy has nothing to do (or read) otherwise
            await self._vault.security_code_used(entry.card_ref)
        _log.info("tokenized", tt_jti=token.jti, ms=_ms(started))
        receipt = self._receipt(attempt, token.raw)
        return IssuedToken(entry.request_id, token.raw, token.jti, token.expires_at, receipt)

    async def _earlier(
        self, cc_jti: str, key: ReleaseKey, repeat: bool
    ) -> asyncio.Future[IssuedToken] | IssuedToken | None:
        """This request's earlier attempt under cc_jti, if any.

        Running or done in this process (releases.py), or, for a repeat, done by any replica
        (the vault): a first attempt costs no vault read.
        """
        running = self._releases.find(cc_jti, key)
        if running is not None or not cc_jti or not repeat:
            return running
        kept = await self._vault.kept_release(cc_jti, key.merchant_id, key.request_id, key.card_ref)
        if kept is None:
            return None
        # No receipt is kept: _replay signs a fresh one for every replay.
        return IssuedToken(kept.request_id, kept.token, kept.tt_jti, kept.expires_at, receipt="")

    async def _replay(
        self, attempt: _Attempt, earlier: asyncio.Future[IssuedToken] | IssuedToken
    ) -> IssuedToken:
        """The same request again under the same context: its one attempt's result."""
        issued = earlier if isinstance(earlier, IssuedToken) else await asyncio.shield(earlier)
        attempt.entry = dataclasses.replace(attempt.entry, tt_jti=issued.jti)
        await self._audit(attempt, "replayed", "")
        _log.info("tokenize_replayed", tt_jti=issued.jti)
        return dataclasses.replace(issued, receipt=self._receipt(attempt, issued.token))

    def _receipt(self, attempt: _Attempt, token: str) -> str:
        """Sign the receipt of the release attempt.entry records (tt_jti set): ids only."""
        entry = attempt.entry
        claims = Receipt(
            merchant=entry.merchant_id,
            app=entry.actor,
            request_id=entry.request_id,
            card_ref=entry.card_ref,
            cc_jti=entry.cc_jti,
            tt_jti=entry.tt_jti,
            tt_sha256=token_sha256(token),
            iat=int(time.time()),
        )
        return self._receipts.sign(claims)


@dataclasses.dataclass(slots=True)
class _Attempt:
    """What the audit record will say, filled in as the steps succeed."""

    entry: AuditEntry
    use: ContextUse | None = None
    """The context use this attempt holds, once claimed."""
    held_security_code: bool = False
    """Whether the card it sent had a CVV (the vault's CVV policy applies then)."""


def _settle(release: Release[IssuedToken], done: asyncio.Task[IssuedToken]) -> None:
    if done.cancelled():
        release.fail(Withdrawn("the attempt was stopped"))
    elif (error := done.exception()) is not None:
        release.fail(error)
    else:
        release.finish(done.result(), keep_until=done.result().expires_at)


def _unresolved(request_id: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        "the attempt under this capture context is not finished yet: ask again",
        request_id=request_id,
    )


def _why_stopped(request: TokenizeRequest) -> str:
    """A call cancelled at its deadline, or withdrawn (the caller left or said so)."""
    late = request.send_by is not None and asyncio.get_running_loop().time() >= request.send_by
    return DeadlineExceeded.reason if late else Withdrawn.reason


def _too_late(request: TokenizeRequest) -> DeadlineExceeded:
    return DeadlineExceeded(
        "the request's deadline passed before the card was sent", request_id=request.request_id
    )


def _shown(kind: IdKind, value: str) -> str:
    return value if is_valid_id(kind, value) else ""


def _validate(request: TokenizeRequest) -> None:
    # relay.ids: the rules the gateway applies too; ids are stored and echoed in clear.
    check_request_id(request.request_id)
    check_card_ref(request.card_ref, request_id=request.request_id)
    if request.app_id:  # "" from a merchant side that names no app
        check_app_id(request.app_id, request_id=request.request_id)
    if not request.capture_context:
        raise InvalidRequest("capture_context is missing", request_id=request.request_id)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
