"""The audit log: hash-chained records of tokenization attempts, never any card data.

Each stored entry is linked to the one before it::

    hash = SHA-256( prev_hash  +  LF (one 0x0A byte)  +  canonical_json(entry) ).hexdigest()

where prev_hash is the previous entry's hash as 64 lowercase hex characters (GENESIS_HASH, 64
zeros, for seq 1), and canonical_json is the UTF-8 bytes of a JSON object holding exactly the
keys at, card_ref, cc_jti, merchant_id, outcome, reason, request_id, seq and tt_jti, keys
sorted, separators "," and ":", ASCII-escaped (ensure_ascii), seq a JSON integer, every other
value a string, and at written as UTC with microseconds: "2025-01-31T23:59:59.123456Z".

So editing any field of a row breaks that row's hash, deleting a row breaks the seq sequence
and the next row's prev_hash, and a head row (the last seq and hash, updated in the same
transaction as each append) shows entries cut off the end. Appends are serialized by the
backend (the SQLite writer thread with BEGIN IMMEDIATE; PostgreSQL SELECT ... FOR UPDATE on the
head row), so the chain never forks. `AuditBatcher` groups appends that arrive together into one
transaction (group commit), which keeps a synced commit per tokenization off the hot path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

R = TypeVar("R")
"""What a success may carry into its transaction (the store's release row)."""

__all__ = [
    "GENESIS_HASH",
    "OUTCOMES",
    "AuditBatcher",
    "AuditEntry",
    "AuditVerdict",
    "ChainVerifier",
    "StoredAuditEntry",
    "canonical_json",
    "chain",
    "check_entry",
    "format_at",
    "link_hash",
]

GENESIS_HASH: Final = "0" * 64
OUTCOMES: Final = frozenset({"started", "success", "failure", "replayed"})
"""started: the card is about to go to Flex (written ahead); success and failure end an
attempt; replayed: a repeat of a finished request got that attempt's token, nothing was sent."""
MAX_FIELD_LENGTH: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    """One tokenization attempt: who, which card_ref, which tokens, and how it ended."""

    merchant_id: str
    card_ref: str
    request_id: str
    cc_jti: str
    tt_jti: str
    outcome: str
    """"started", "success", "failure" or "replayed" (see OUTCOMES)."""
    reason: str
    """"" on success, else a reason code such as CARD_NOT_FOUND, NOT_GRANTED, FLEX_REJECTED."""


@dataclasses.dataclass(frozen=True, slots=True)
class StoredAuditEntry:
    """An entry as chained and stored."""

    seq: int
    at: dt.datetime
    entry: AuditEntry
    prev_hash: str
    hash: str


@dataclasses.dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The result of walking the chain: ok, or the first seq whose link is broken and why."""

    ok: bool
    checked: int
    first_broken: int | None
    problem: str


def check_entry(entry: AuditEntry) -> None:
    """Refuse an entry the chain should not hold (unknown outcome, unbounded fields)."""
    if entry.outcome not in OUTCOMES:
        raise ValueError("audit outcome must be one of " + ", ".join(sorted(OUTCOMES)))
    for field in dataclasses.fields(entry):
        value = getattr(entry, field.name)
        if not isinstance(value, str) or len(value) > MAX_FIELD_LENGTH:
            raise ValueError(f"audit {field.name} must be a string of at most 256 characters")


def format_at(at: dt.datetime) -> str:
    """The canonical UTC text of a time, microsecond precision."""
    if at.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(seq: int, at: dt.datetime, entry: AuditEntry) -> bytes:
    """The exact bytes an entry's hash covers (besides prev_hash); see the module docstring."""
    fields: dict[str, object] = dataclasses.asdict(entry)
    fields.update(seq=seq, at=format_at(at))
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def link_hash(prev_hash: str, seq: int, at: dt.datetime, entry: AuditEntry) -> str:
    """The hash of an entry chained after prev_hash."""
    digest = hashlib.sha256(prev_hash.encode("ascii") + b"\n")
    digest.update(canonical_json(seq, at, entry))
    return digest.hexdigest()


def chain(
    head_seq: int, head_hash: str, entries: Sequence[tuple[dt.datetime, AuditEntry]]
) -> list[StoredAuditEntry]:
    """Link entries after the head; a backend calls this while it holds the append lock."""
    stored: list[StoredAuditEntry] = []
    seq, prev = head_seq, head_hash
    for at, entry in entries:
        seq += 1
        current = link_hash(prev, seq, at, entry)
        stored.append(StoredAuditEntry(seq, at, entry, prev, current))
        prev = current
    return stored


class ChainVerifier:
    """Walks stored entries in seq order and stops at the first broken link."""

    def __init__(self) -> None:
        """Start at the genesis link."""
        self.checked = 0
        self._seq = 0
        self._hash = GENESIS_HASH
        self._broken: AuditVerdict | None = None

    def feed(self, row: StoredAuditEntry) -> bool:
        """Check the next row; False once the chain is broken (stop feeding then)."""
        problem = self._problem(row)
        if problem:
            self._broken = AuditVerdict(
                ok=False, checked=self.checked, first_broken=row.seq, problem=problem
            )
            return False
        self.checked += 1
        self._seq, self._hash = row.seq, row.hash
        return True

    def _problem(self, row: StoredAuditEntry) -> str:
        if row.seq != self._seq + 1:
            first, last = self._seq + 1, row.seq - 1
            missing = f"seq {first} is" if first == last else f"seqs {first} to {last} are"
            return f"seq {row.seq} follows seq {self._seq}: {missing} missing"
        if row.prev_hash != self._hash:
            return f"seq {row.seq}: prev_hash is not the hash of seq {self._seq}"
        if link_hash(row.prev_hash, row.seq, row.at, row.entry) != row.hash:
            return f"seq {row.seq}: the hash does not match the entry's contents"
        return ""

    def finish(self, head: tuple[int, str]) -> AuditVerdict:
        """The verdict, given the head row's (seq, hash) once every row was fed."""
        if self._broken is not None:
            return self._broken
        head_seq, head_hash = head
        if head_seq > self._seq:
            problem = f"the head records seq {head_seq}, the chain ends at seq {self._seq}: cut off"
            return AuditVerdict(
                ok=False, checked=self.checked, first_broken=self._seq + 1, problem=problem
            )
        if (head_seq, head_hash) != (self._seq, self._hash):
            problem = f"the head (seq {head_seq}) does not match the last entry (seq {self._seq})"
            first = min(head_seq + 1, self._seq)
            return AuditVerdict(ok=False, checked=self.checked, first_broken=first, problem=problem)
        return AuditVerdict(ok=True, checked=self.checked, first_broken=None, problem="")


AppendFunction = Callable[
    [Sequence[tuple[dt.datetime, AuditEntry]], Sequence[R]], Awaitable[list[StoredAuditEntry]]
]


class AuditBatcher(Generic[R]):
    """Group commit: appends that arrive while one is being written go in the next transaction.

    Order is kept (FIFO), each caller gets its own seq, and a failed transaction fails every
    caller in it. A caller that is cancelled while waiting still has its entry written. A
    success may carry its release, written in the same transaction as its record.
    """

    def __init__(self, append: AppendFunction[R], *, max_batch: int = 256) -> None:
        """Batch calls to append (a Store's append_audit), at most max_batch per transaction."""
        self._append = append
        self._max_batch = max_batch
        self._pending: list[_Pending[R]] = []
        self._task: asyncio.Task[None] | None = None

    async def append(self, at: dt.datetime, entry: AuditEntry, release: R | None = None) -> int:
        """Queue one entry and wait until its transaction commits; return its seq."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(at, entry, release, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="vault-audit-append")
        return await future

    async def drain(self) -> None:
        """Wait until everything queued so far is written (before closing the store)."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            entries = [(item.at, item.entry) for item in batch]
            releases = [item.release for item in batch if item.release is not None]
            try:
                stored = await self._append(entries, releases)
            except asyncio.CancelledError:
                for item in batch + self._pending:
                    item.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, row in zip(batch, stored, strict=True):
                if not item.future.done():
                    item.future.set_result(row.seq)


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending(Generic[R]):
    at: dt.datetime
    entry: AuditEntry
    release: R | None
    future: asyncio.Future[int]
