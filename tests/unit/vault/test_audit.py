"""The audit chain, on both backends: appends, concurrency, and tampering found by verify."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Callable

import psycopg
import pytest

from pci_side.vault import AuditEntry, CardVault, open_vault
from pci_side.vault.audit import (
    GENESIS_HASH,
    StoredAuditEntry,
    canonical_json,
    check_entry,
    head_mac,
    link_hash,
)
from relay.config import VaultConfig
from relay.secrets import Secret
from tests.vault_backends import drop_audit_guards, run_sql

AT = dt.datetime(2025, 1, 31, 23, 59, 59, 123456, tzinfo=dt.UTC)
KEY = Secret(bytes(range(32)))
Link = Callable[[str, int, dt.datetime, AuditEntry], str]


def entry(number: int, outcome: str = "success", reason: str = "") -> AuditEntry:
    return AuditEntry(
        f"m{number % 3}", f"card-{number}", f"req-{number}", "cc", "tt", outcome, reason
    )


async def record(vault: CardVault, count: int) -> list[int]:
    return [await vault.record_attempt(entry(number)) for number in range(count)]


def test_hash_is_a_keyed_mac_over_prev_hash_and_the_documented_canonical_json() -> None:
    """The link hash is HMAC-SHA256 under the audit key over prev_hash, LF, canonical JSON."""
    item = AuditEntry("m1", "card-1", "req-1", "cc-jti", "tt-jti", "admin", "grant", "ops", "a=1")
    canonical = (
        '{"actor":"ops","at":"2025-01-31T23:59:59.123456Z","card_ref":"card-1","cc_jti":"cc-jti",'
        '"detail":"a=1","merchant_id":"m1","outcome":"admin","reason":"grant",'
        '"request_id":"req-1","seq":1,"tt_jti":"tt-jti"}'
    )
    message = f"{GENESIS_HASH}\n{canonical}".encode()
    expected = hmac.new(KEY.get_secret_value(), message, hashlib.sha256).hexdigest()
    assert (canonical.encode(), expected) == (
        canonical_json(1, AT, item),
        link_hash(KEY, GENESIS_HASH, 1, AT, item),
    )
    assert expected != link_hash(Secret(b"\xff" * 32), GENESIS_HASH, 1, AT, item)


async def test_a_chain_of_entries_verifies(vault: CardVault) -> None:
    """Twenty appends get seqs 1 to 20, link to each other, and verify."""
    seqs = await record(vault, 20)
    newest = await vault.audit_entries(limit=100)
    verdict = await vault.verify_audit(batch_size=7)
    assert (list(range(1, 21)), list(range(20, 0, -1))) == (seqs, [e.seq for e in newest])
    assert [e.hash for e in newest[1:]] == [e.prev_hash for e in newest[:-1]]
    assert (True, 20, None, "") == (
        verdict.ok,
        verdict.checked,
        verdict.first_broken,
        verdict.problem,
    )


async def test_stored_entries_read_back_as_appended(vault: CardVault) -> None:
    """An entry reads back with its fields, a UTC time and the genesis prev_hash."""
    appended = entry(1, "failure", "NOT_GRANTED")
    await vault.record_attempt(appended)
    [stored] = await vault.audit_entries()
    assert (appended, GENESIS_HASH, dt.timedelta(0)) == (
        stored.entry,
        stored.prev_hash,
        stored.at.utcoffset(),
    )


async def test_an_empty_log_verifies(vault: CardVault) -> None:
    """A vault without entries has a valid (empty) chain."""
    assert (True, 0) == ((v := await vault.verify_audit()).ok, v.checked)


async def test_concurrent_appends_from_two_vaults_form_one_chain(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Fifty appends at once, split over two vaults on one database, give seqs 1-50 in one chain."""
    async with await open_vault(vault_config) as other:
        seqs = await asyncio.gather(
            *(
                (vault if number % 2 else other).record_attempt(entry(number))
                for number in range(50)
            )
        )
    verdict = await vault.verify_audit()
    assert (list(range(1, 51)), True, 50) == (sorted(seqs), verdict.ok, verdict.checked)


async def test_the_log_refuses_updates_and_deletes(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Triggers make audit_log append-only for anyone who has not dropped them."""
    await record(vault, 3)
    for statement in ("UPDATE audit_log SET reason = 'x'", "DELETE FROM audit_log"):
        with pytest.raises((sqlite3.Error, psycopg.Error), match="append-only"):
            run_sql(vault_config, statement)
    assert 3 == (await vault.verify_audit()).checked


async def test_an_edited_entry_is_reported_at_its_seq(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Changing one row's reason breaks the chain exactly at that row."""
    await record(vault, 10)
    drop_audit_guards(vault_config)
    run_sql(vault_config, "UPDATE audit_log SET reason = 'FLEX_REJECTED' WHERE seq = 6")
    verdict = await vault.verify_audit(batch_size=4)
    assert (False, 6, 5, "seq 6: the hash does not match the entry's contents") == (
        verdict.ok,
        verdict.first_broken,
        verdict.checked,
        verdict.problem,
    )


async def test_a_deleted_entry_is_reported(vault: CardVault, vault_config: VaultConfig) -> None:
    """Deleting a middle row breaks the link at the row after it, naming the missing seq."""
    await record(vault, 10)
    drop_audit_guards(vault_config)
    run_sql(vault_config, "DELETE FROM audit_log WHERE seq = 4")
    verdict = await vault.verify_audit()
    assert (False, 5, "seq 5 follows seq 3: seq 4 is missing") == (
        verdict.ok,
        verdict.first_broken,
        verdict.problem,
    )


async def test_an_edited_hash_is_reported_at_its_seq(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Overwriting one row's hash is caught at that row."""
    await record(vault, 10)
    drop_audit_guards(vault_config)
    run_sql(vault_config, "UPDATE audit_log SET hash = ? WHERE seq = 8", ["ab" * 32])
    verdict = await vault.verify_audit()
    assert (False, 8) == (verdict.ok, verdict.first_broken)


async def test_a_rewritten_tail_is_reported_where_the_links_break(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """A row edited with its own hash recomputed is still caught by the next row's prev_hash."""
    await record(vault, 5)
    drop_audit_guards(vault_config)
    [stored] = [e for e in await vault.audit_entries() if e.seq == 3]
    forged = dataclasses.replace(stored.entry, outcome="failure", reason="X")
    new_hash = link_hash(vault_config.audit_key, stored.prev_hash, 3, stored.at, forged)
    run_sql(
        vault_config,
        "UPDATE audit_log SET outcome = 'failure', reason = 'X', hash = ? WHERE seq = 3",
        [new_hash],
    )
    verdict = await vault.verify_audit()
    assert (False, 4, "seq 4: prev_hash is not the hash of seq 3") == (
        verdict.ok,
        verdict.first_broken,
        verdict.problem,
    )


@pytest.mark.parametrize("mac", ["kept", "plain", "emptied"])
async def test_a_tail_cut_off_with_the_head_moved_back_is_reported(
    vault: CardVault, vault_config: VaultConfig, mac: str
) -> None:
    """Rows deleted and the head pointed at the new last row: the head's MAC gives it away."""
    await record(vault, 6)
    drop_audit_guards(vault_config)
    [last] = [e for e in await vault.audit_entries() if e.seq == 4]
    run_sql(vault_config, "DELETE FROM audit_log WHERE seq >= 5")
    [(old_mac,)] = run_sql(vault_config, "SELECT mac FROM audit_head WHERE id = 1")
    forged = {"kept": old_mac, "plain": plain_head(4, last.hash), "emptied": ""}[mac]
    run_sql(
        vault_config,
        "UPDATE audit_head SET seq = 4, hash = ?, mac = ? WHERE id = 1",
        [last.hash, forged],
    )
    verdict = await vault.verify_audit()
    assert (False, 5) == (verdict.ok, verdict.first_broken)
    assert "not written with the audit key" in verdict.problem


async def test_a_head_moved_back_with_the_audit_key_verifies(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """The check above rests on the key alone: with it, the same cut goes unseen."""
    await record(vault, 6)
    drop_audit_guards(vault_config)
    [last] = [e for e in await vault.audit_entries() if e.seq == 4]
    run_sql(vault_config, "DELETE FROM audit_log WHERE seq >= 5")
    mac = head_mac(vault_config.audit_key, 4, last.hash)
    run_sql(
        vault_config,
        "UPDATE audit_head SET seq = 4, hash = ?, mac = ? WHERE id = 1",
        [last.hash, mac],
    )
    verdict = await vault.verify_audit()
    assert (True, 4) == (verdict.ok, verdict.checked)


async def test_entries_cut_off_the_end_are_reported(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """Deleting the newest rows is caught by the head row, at the first missing seq."""
    await record(vault, 6)
    drop_audit_guards(vault_config)
    run_sql(vault_config, "DELETE FROM audit_log WHERE seq >= 5")
    verdict = await vault.verify_audit()
    assert (False, 5, 4) == (verdict.ok, verdict.first_broken, verdict.checked)


@pytest.mark.parametrize(
    "bad",
    [
        AuditEntry("m", "c", "r", "", "", "maybe", ""),
        AuditEntry("m", "c", "r" * 257, "", "", "success", ""),
        AuditEntry("m", "c", "r", "", "", "admin", "list", "o" * 257),
        AuditEntry("m", "c", "r", "", "", "admin", "list", "ops", "d" * 257),
    ],
    ids=["outcome", "length", "actor", "detail"],
)
async def test_record_attempt_refuses_malformed_entries(vault: CardVault, bad: AuditEntry) -> None:
    """An unknown outcome or an oversized field is refused and nothing is appended."""
    with pytest.raises(ValueError, match="audit"):
        await vault.record_attempt(bad)
    assert [] == await vault.audit_entries()


def plain_sha256(prev_hash: str, seq: int, at: dt.datetime, item: AuditEntry) -> str:
    """The unkeyed link of the chain before the audit key, as an attacker could compute it."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_json(seq, at, item)).hexdigest()


def keyed(key: Secret[bytes]) -> Link:
    return lambda prev, seq, at, item: link_hash(key, prev, seq, at, item)


def plain_head(seq: int, hash_: str) -> str:
    """A head MAC as an attacker without the key could compute one."""
    return hashlib.sha256(f"audit-head\n{seq}\n{hash_}".encode()).hexdigest()


async def rewrite_from(
    vault: CardVault,
    config: VaultConfig,
    first: int,
    link: Link,
    head: Callable[[int, str], str] = plain_head,
) -> None:
    """Drop the guards, forge every row from seq first on and the head, re-linking with link."""
    drop_audit_guards(config)
    rows = sorted(await vault.audit_entries(), key=lambda stored: stored.seq)
    prev = rows[first - 2].hash if first > 1 else GENESIS_HASH
    for stored in rows[first - 1 :]:
        forged = dataclasses.replace(stored.entry, outcome="failure", reason="FORGED")
        prev = forge_row(config, stored, forged, prev, link(prev, stored.seq, stored.at, forged))
    run_sql(
        config,
        "UPDATE audit_head SET hash = ?, mac = ? WHERE id = 1",
        [prev, head(rows[-1].seq, prev)],
    )


def forge_row(
    config: VaultConfig, stored: StoredAuditEntry, forged: AuditEntry, prev: str, new: str
) -> str:
    run_sql(
        config,
        "UPDATE audit_log SET outcome = ?, reason = ?, prev_hash = ?, hash = ? WHERE seq = ?",
        [forged.outcome, forged.reason, prev, new, stored.seq],
    )
    return new


@pytest.mark.parametrize("first", [4, 1], ids=["tail", "whole-chain"])
@pytest.mark.parametrize("attacker", ["sha256", "other-key"])
async def test_a_rewrite_without_the_audit_key_is_found_at_its_first_row(
    vault: CardVault, vault_config: VaultConfig, attacker: str, first: int
) -> None:
    """Rows and head rewritten with hashes recomputed without the key fail at the first of them."""
    await record(vault, 6)
    link = plain_sha256 if attacker == "sha256" else keyed(Secret(secrets.token_bytes(32)))
    await rewrite_from(vault, vault_config, first, link)
    verdict = await vault.verify_audit(batch_size=4)
    problem = f"seq {first}: the hash does not match the entry's contents"
    assert (False, first, first - 1, problem) == (
        verdict.ok,
        verdict.first_broken,
        verdict.checked,
        verdict.problem,
    )


async def test_the_same_rewrite_with_the_audit_key_verifies(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """With the key the forgery is undetectable: the keyed test above rests on the key alone."""
    await record(vault, 6)
    key = vault_config.audit_key
    await rewrite_from(vault, vault_config, 4, keyed(key), lambda *head: head_mac(key, *head))
    verdict = await vault.verify_audit(batch_size=4)
    outcomes = [stored.entry.outcome for stored in await vault.audit_entries()]
    assert (True, 6, ["failure"] * 3 + ["success"] * 3) == (verdict.ok, verdict.checked, outcomes)


async def test_a_vault_opened_with_another_audit_key_finds_the_chain_broken_at_seq_1(
    vault: CardVault, vault_config: VaultConfig
) -> None:
    """The key is part of every link: the right chain under the wrong key fails at once."""
    await record(vault, 3)
    other = dataclasses.replace(vault_config, audit_key=Secret(secrets.token_bytes(32)))
    async with await open_vault(other) as wrong:
        verdict = await wrong.verify_audit()
    assert (False, 1) == (verdict.ok, verdict.first_broken)


async def test_refusal_and_admin_records_chain_and_verify(vault: CardVault) -> None:
    """Refusals and admin actions read back with their actor and detail, in one valid chain."""
    await vault.record_attempt(entry(1))
    await vault.record_refusal("PERMISSION_DENIED", "sha256:" + "ab" * 32)
    await vault.record_refusal(
        "INVALID_REQUEST", "merchant:m1", merchant_id="m1", request_id="r1", card_ref="card-1"
    )
    await vault.record_admin("grant", "alice", "changed=1", merchant_id="m2", card_ref="card-1")
    await vault.record_admin("list", "bob", "shown=0")
    stored = [row.entry for row in reversed(await vault.audit_entries())]
    verdict = await vault.verify_audit(batch_size=2)
    assert [
        entry(1),
        AuditEntry("", "", "", "", "", "refused", "PERMISSION_DENIED", "sha256:" + "ab" * 32),
        AuditEntry("m1", "card-1", "r1", "", "", "refused", "INVALID_REQUEST", "merchant:m1"),
        AuditEntry("m2", "card-1", "", "", "", "admin", "grant", "alice", "changed=1"),
        AuditEntry("", "", "", "", "", "admin", "list", "bob", "shown=0"),
    ] == stored
    assert (True, 5) == (verdict.ok, verdict.checked)


async def test_an_edited_actor_is_reported(vault: CardVault, vault_config: VaultConfig) -> None:
    """actor and detail are covered by the hash like every other field."""
    await vault.record_admin("rotate_key", "alice", "rewrapped=0 version=1")
    await vault.record_admin("list", "alice", "shown=0")
    drop_audit_guards(vault_config)
    run_sql(vault_config, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    run_sql(vault_config, "UPDATE audit_log SET detail = 'rewrapped=9' WHERE seq = 1")
    assert 1 == (await vault.verify_audit()).first_broken


@pytest.mark.parametrize("outcome", ["refuse", "ADMIN", "", "deleted"])
def test_check_entry_refuses_unknown_outcomes(outcome: str) -> None:
    """Only the documented outcomes may enter the chain."""
    with pytest.raises(ValueError, match="audit outcome must be one of"):
        check_entry(AuditEntry("m", "c", "r", "", "", outcome, ""))


async def test_record_admin_refuses_an_oversized_detail(vault: CardVault) -> None:
    """An admin record is checked like any other: nothing is appended."""
    with pytest.raises(ValueError, match="audit detail"):
        await vault.record_admin("import", "alice", "x" * 257)
    assert [] == await vault.audit_entries()
