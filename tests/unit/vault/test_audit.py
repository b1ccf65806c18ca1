"""The audit chain, on both backends: appends, concurrency, and tampering found by verify."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import sqlite3

import psycopg
import pytest

from pci_side.vault import AuditEntry, CardVault, open_vault
from pci_side.vault.audit import GENESIS_HASH, canonical_json, link_hash
from relay.config import VaultConfig
from tests.vault_backends import drop_audit_guards, run_sql

AT = dt.datetime(2025, 1, 31, 23, 59, 59, 123456, tzinfo=dt.UTC)


def entry(number: int, outcome: str = "success", reason: str = "") -> AuditEntry:
    return AuditEntry(
        f"m{number % 3}", f"card-{number}", f"req-{number}", "cc", "tt", outcome, reason
    )


async def record(vault: CardVault, count: int) -> list[int]:
    return [await vault.record_attempt(entry(number)) for number in range(count)]


def test_hash_covers_prev_hash_and_the_documented_canonical_json() -> None:
    """The link hash is SHA-256 over prev_hash, a newline and the exact canonical JSON."""
    item = AuditEntry("m1", "card-1", "req-1", "cc-jti", "tt-jti", "success", "")
    canonical = (
        '{"at":"2025-01-31T23:59:59.123456Z","card_ref":"card-1","cc_jti":"cc-jti",'
        '"merchant_id":"m1","outcome":"success","reason":"","request_id":"req-1","seq":1,'
        '"tt_jti":"tt-jti"}'
    )
    expected = hashlib.sha256(f"{GENESIS_HASH}\n{canonical}".encode()).hexdigest()
    assert (canonical.encode(), expected) == (
        canonical_json(1, AT, item),
        link_hash(GENESIS_HASH, 1, AT, item),
    )


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
    new_hash = link_hash(stored.prev_hash, 3, stored.at, forged)
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
    ],
    ids=["outcome", "length"],
)
async def test_record_attempt_refuses_malformed_entries(vault: CardVault, bad: AuditEntry) -> None:
    """An unknown outcome or an oversized field is refused and nothing is appended."""
    with pytest.raises(ValueError, match="audit"):
        await vault.record_attempt(bad)
    assert [] == await vault.audit_entries()
