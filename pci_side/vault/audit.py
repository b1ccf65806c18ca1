"""The audit log: keyed, hash-chained records of tokenizations, refusals and admin actions.

Each stored entry is linked to the one before it::

    hash = HMAC-SHA256( audit_key,  prev_hash + LF (one 0x0A byte) + canonical_json(entry) )
           .hexdigest()

where audit_key is the vault's audit key (RELAY_VAULT_AUDIT_KEY_FILE, raw bytes, separate from
the KEKs and the fingerprint key), prev_hash is the previous entry's hash as 64 lowercase hex
characters (GENESIS_HASH, 64 zeros, for seq 1), and canonical_json is the UTF-8 bytes of a JSON
object holding exactly the keys actor, at, card_ref, cc_jti, detail, merchant_id, outcome,
reason, request_id, seq and tt_jti, keys sorted, separators "," and ":", ASCII-escaped
(ensure_ascii), seq a JSON integer, every other value a string, and at written as UTC with
microseconds: "2025-01-31T23:59:59.123456Z". No entry ever holds card data.

So editing any field of a row breaks that row's hash, deleting a row breaks the seq sequence
and the next row's prev_hash, and a head row (the last seq and hash, updated in the same
transaction as each append) shows entries cut off the end. Appends are serialized by the
backend (the SQLite writer thread with BEGIN IMMEDIATE; PostgreSQL SELECT ... FOR UPDATE on the
head row), so the chain never forks. The vault groups appends that arrive together into one
transaction (batching.GroupCommit), which keeps a synced commit per tokenization off the hot
path.

The key is what makes the chain evidence against someone who can write to the database: without
it, one who drops the append-only triggers could rewrite the tail and the head row and recompute
every hash. A chain written before the key was introduced (plain SHA-256) fails verification at
seq 1 (see migrations.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Final

from relay.secrets import Secret

__all__ = [
    "GENESIS_HASH",
    "OUTCOMES",
    "AuditEntry",
    "AuditVerdict",
    "ChainVerifier",
    "StoredAuditEntry",
    "canonical_json",
    "chain",
    "check_entry",
    "format_at",
    "head_mac",
    "link_hash",
]

GENESIS_HASH: Final = "0" * 64
OUTCOMES: Final = frozenset({"started", "success", "failure", "replayed", "refused", "admin"})
"""started: the card is about to go to Flex (written ahead); success and failure end an
attempt; replayed: a repeat of a finished request got that attempt's token, nothing was sent;
refused: a call turned away before the tokenizer ran (reason: the relay reason code);
admin: an operator's command (reason: the action, detail: its counts and parameters)."""
MAX_FIELD_LENGTH: Final = 256


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    """One record: a tokenization attempt, a refused call or an administrative action."""

    merchant_id: str
    card_ref: str
    request_id: str
    cc_jti: str
    tt_jti: str
    outcome: str
    """One of OUTCOMES."""
    reason: str
    """"" on success, else a reason code such as CARD_NOT_FOUND, NOT_GRANTED, FLEX_REJECTED;
    for admin records the action (import, grant, revoke, rotate_key, list, export)."""
    actor: str = ""
    """Who: the calling app, the peer certificate's identity, or the operator."""
    detail: str = ""
    """Admin records: counts and parameters as space-separated key=value pairs, never card data."""


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


def link_hash(
    audit_key: Secret[bytes], prev_hash: str, seq: int, at: dt.datetime, entry: AuditEntry
) -> str:
    """The keyed hash of an entry chained after prev_hash."""
    mac = hmac.new(audit_key.get_secret_value(), prev_hash.encode("ascii") + b"\n", hashlib.sha256)
    mac.update(canonical_json(seq, at, entry))
    return mac.hexdigest()


def chain(
    audit_key: Secret[bytes],
    head_seq: int,
    head_hash: str,
    entries: Sequence[tuple[dt.datetime, AuditEntry]],
) -> list[StoredAuditEntry]:
    """Link entries after the head; a backend calls this while it holds the append lock."""
    stored: list[StoredAuditEntry] = []
    seq, prev = head_seq, head_hash
    for at, entry in entries:
        seq += 1
        current = link_hash(audit_key, prev, seq, at, entry)
        stored.append(StoredAuditEntry(seq, at, entry, prev, current))
        prev = current
    return stored


AuditHead = tuple[int, str, str]
"""The head row: the last seq, its hash, and head_mac over both ("" only for the empty chain)."""


def head_mac(audit_key: Secret[bytes], seq: int, hash_: str) -> str:
    """The keyed MAC of the head row, so a writer without the key cannot move it back.

    Without it, dropping the last records and pointing the head at the new last one would
    verify: each record's hash is keyed, but which record is last would not be.
    """
    text = f"audit-head\n{seq}\n{hash_}".encode("ascii")
    return hmac.new(audit_key.get_secret_value(), text, hashlib.sha256).hexdigest()


class ChainVerifier:
    """Walks stored entries in seq order and stops at the first broken link."""

    def __init__(self, audit_key: Secret[bytes]) -> None:
        """Start at the genesis link; hashes are checked under audit_key."""
        self._key = audit_key
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
        if link_hash(self._key, row.prev_hash, row.seq, row.at, row.entry) != row.hash:
            return f"seq {row.seq}: the hash does not match the entry's contents"
        return ""

    def finish(self, head: AuditHead) -> AuditVerdict:
        """The verdict, given the head row once every row was fed."""
        if self._broken is not None:
            return self._broken
        head_seq, head_hash, mac = head
        empty = (head_seq, head_hash, mac) == (0, GENESIS_HASH, "")
        if not empty and not hmac.compare_digest(mac, head_mac(self._key, head_seq, head_hash)):
            problem = f"the head (seq {head_seq}) was not written with the audit key: moved"
            first = min(head_seq, self._seq) + 1
            return AuditVerdict(ok=False, checked=self.checked, first_broken=first, problem=problem)
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
