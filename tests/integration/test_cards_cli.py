"""`relay cards ...` as the operator runs it: the real command, a real vault, files on disk.

Every test drives the installed `relay` command as a subprocess, with RELAY_VAULT_* pointing at
a fresh vault (SQLite, and PostgreSQL where marked by the backend id), and scans everything
each run printed for the test PANs the import files hold.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pci_side.vault import open_vault
from pci_side.vault.audit import AuditEntry
from pci_side.vault.kek import read_keyring
from relay.cards import Pan
from relay.config import VaultConfig
from tests.cards_testdata import TEST_CARDS, assert_no_test_pans
from tests.vault_backends import (
    BACKENDS,
    drop_audit_guards,
    generated_pan,
    run_sql,
    vault_env,
)

RELAY = Path(sys.executable).with_name("relay")
HEADER = "card_ref,pan,exp_month,exp_year,cvv,type,merchants"
VISA, MASTERCARD, AMEX = TEST_CARDS[0].digits, TEST_CARDS[3].digits, TEST_CARDS[6].digits
DISCOVER, JCB = TEST_CARDS[8].digits, TEST_CARDS[12].digits
NOT_LUHN = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
SUMMARY = re.compile(
    r"imported: (\d+) created, (\d+) unchanged, (\d+) rejected \(of (\d+) rows\) "
    r"in \d+\.\d\d s \(\d+ cards/s\)"
)

MIXED_CSV = "\n".join(
    [
        HEADER,
        f"good-visa,{VISA[:4]} {VISA[4:8]} {VISA[8:12]} {VISA[12:]},12,2031,123,,m1;m2",
        f"bad-luhn,{NOT_LUHN},12,2031,,,",
        "",
        "# a comment: skipped, but counted",
        f"expired,{MASTERCARD},1,2020,,,",
        f"good-amex,{AMEX[:4]}-{AMEX[4:10]}-{AMEX[10:]},03,33,1234,003,m3",
        f"good-visa,{DISCOVER},12,2031,,,",
        "too-few,1,2",
        f"twin-visa,{VISA},12,2031,,,m1",
        f"good-jcb,{JCB},6,2032,,,",
        f"bad-cvv,{DISCOVER},12,2031,12,,",
    ]
)
MIXED_ERRORS = [
    "line 3: pan fails the Luhn check",
    "line 6: card expired 01/2020",
    "line 8: duplicate card_ref good-visa (first on line 2)",
    "line 9: expected 7 fields, found 3",
    "line 10: this card is already in the vault under another card_ref",
    "line 12: cvv must be a string of 3 or 4 digits",
]
MIXED_CARDS = [
    # card_ref, bin, last4, type, month, year, has cvv, merchants
    ("good-amex", AMEX[:6], AMEX[-4:], "003", 3, 2033, True, ["m3"]),
    ("good-jcb", JCB[:6], JCB[-4:], "007", 6, 2032, False, []),
    ("good-visa", VISA[:6], VISA[-4:], "001", 12, 2031, True, ["m1", "m2"]),
]


@dataclasses.dataclass(frozen=True)
class Vault:
    """A vault for one test: its config, the env that names it, and a place for files."""

    config: VaultConfig
    env: dict[str, str]
    directory: Path

    def relay(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `relay ARGS` against this vault; check its output holds no PAN and no traceback."""
        return run_relay(self.env, *args)

    def write(self, name: str, text: str) -> Path:
        path = self.directory / name
        path.write_text(text + "\n", encoding="utf-8")
        return path

    def cards(self) -> list[dict[str, object]]:
        result = self.relay("cards", "list", "--json", "--limit", "10000")
        assert (0, "") == (result.returncode, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines()]


def run_relay(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(RELAY), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert_no_test_pans(text, f"{name} of relay {' '.join(args[:2])}")
        assert "Traceback" not in text
    return result


def base_env() -> dict[str, str]:
    """The test process's environment without any RELAY_* setting of its own."""
    return {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}


def make_vault(config: VaultConfig, directory: Path) -> Vault:
    return Vault(config, base_env() | vault_env(config, directory), directory)


@pytest.fixture(params=BACKENDS)
def any_vault(request: pytest.FixtureRequest, tmp_path: Path) -> Vault:
    """A fresh vault on each backend in turn (tests/vault_backends.py makes them)."""
    prefix = "postgres" if request.param == "postgresql" else request.param
    return make_vault(request.getfixturevalue(f"{prefix}_vault_config"), tmp_path)


@pytest.fixture
def sqlite_vault(request: pytest.FixtureRequest, tmp_path: Path) -> Vault:
    """A fresh SQLite vault."""
    return make_vault(request.getfixturevalue("sqlite_vault_config"), tmp_path)


def card_fields(card: dict[str, object]) -> tuple[object, ...]:
    keys = ("card_ref", "bin", "last4", "card_type", "exp_month", "exp_year")
    more = ("has_security_code", "merchants")
    return tuple(card[key] for key in (*keys, *more))


def summary_counts(stdout: str) -> tuple[int, ...]:
    match = SUMMARY.fullmatch(stdout.strip())
    assert match is not None, stdout
    return tuple(int(group) for group in match.groups())


def test_a_mixed_file_stores_exactly_the_good_rows(any_vault: Vault) -> None:
    """Bad rows are named by line on stderr, exit 1, and only the good rows are in the vault."""
    path = any_vault.write("cards.csv", MIXED_CSV)
    result = any_vault.relay("cards", "import", "--batch-size", "2", str(path))
    assert (1, MIXED_ERRORS) == (result.returncode, result.stderr.splitlines())
    assert (3, 0, 6, 9) == summary_counts(result.stdout)
    cards = any_vault.cards()
    assert [tuple(card) for card in MIXED_CARDS] == [card_fields(card) for card in cards]
    assert [1, 1, 1] == [card["key_version"] for card in cards]
    assert ["XXXXXXXXXXXX0005", "XXXXXXXXXXXX0000", "XXXXXXXXXXXX1111"] == [
        card["masked_pan"] for card in cards
    ]


def test_rerunning_a_file_changes_nothing(any_vault: Vault) -> None:
    """The second run reports every valid row unchanged and leaves the vault as it was."""
    path = any_vault.write("cards.csv", MIXED_CSV)
    any_vault.relay("cards", "import", str(path))
    before = any_vault.cards()
    again = any_vault.relay("cards", "import", str(path))
    assert (1, MIXED_ERRORS) == (again.returncode, again.stderr.splitlines())
    assert (0, 3, 6, 9) == summary_counts(again.stdout)
    assert before == any_vault.cards()


def test_a_clean_file_exits_0_and_a_json_lines_file_reads_too(sqlite_vault: Vault) -> None:
    """No rejected row means exit 0; JSON Lines takes merchants as a list or a string."""
    lines = [
        {"card_ref": "j-1", "pan": VISA, "exp_month": 12, "exp_year": 2031, "merchants": ["m1"]},
        {"card_ref": "j-2", "pan": AMEX, "exp_month": "1", "exp_year": "32", "merchants": "m1 m2"},
    ]
    path = sqlite_vault.write("cards.jsonl", "\n".join(json.dumps(line) for line in lines))
    result = sqlite_vault.relay("cards", "import", str(path))
    assert (0, "") == (result.returncode, result.stderr)
    assert (2, 0, 0, 2) == summary_counts(result.stdout)
    assert [["m1"], ["m1", "m2"]] == [card["merchants"] for card in sqlite_vault.cards()]


def test_a_bad_json_line_is_rejected_alone(sqlite_vault: Vault) -> None:
    """A line that is not JSON is one rejected row; the rows around it are imported."""
    good = json.dumps({"card_ref": "j-1", "pan": VISA, "exp_month": 12, "exp_year": 2031})
    path = sqlite_vault.write("cards.ndjson", good + '\n{"card_ref": "j-2", "pan"')
    result = sqlite_vault.relay("cards", "import", str(path))
    assert (1, ["line 2: not valid JSON"]) == (result.returncode, result.stderr.splitlines())
    assert ["j-1"] == [card["card_ref"] for card in sqlite_vault.cards()]


def test_a_dry_run_validates_and_writes_nothing(sqlite_vault: Vault) -> None:
    """--dry-run reports the file's own problems and leaves the vault empty."""
    path = sqlite_vault.write("cards.csv", MIXED_CSV)
    result = sqlite_vault.relay("cards", "import", "--dry-run", str(path))
    file_errors = [line for line in MIXED_ERRORS if "vault" not in line]
    assert (1, file_errors) == (result.returncode, result.stderr.splitlines())
    assert result.stdout.startswith("dry run: 4 valid, 5 rejected (of 9 rows) in ")
    assert [] == sqlite_vault.cards()


USE_FORMAT = "use .csv or .jsonl, or --format"
NOT_A_HEADER = (
    "bad header row: unknown columns (not shown); "
    "missing columns card_ref, pan, exp_month, exp_year"
)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("missing.csv", None, "relay: cannot read {path}: No such file or directory"),
        ("cards.txt", HEADER, "relay: cannot tell the format of {path}: " + USE_FORMAT),
        ("cards.csv", f"card-1,{VISA},12,2031", "relay: {path}: line 1: " + NOT_A_HEADER),
        ("empty.csv", "", "relay: {path}: no header row (card_ref,pan,exp_month,exp_year,...)"),
    ],
    ids=["missing", "unknown_extension", "no_header", "empty"],
)
def test_a_file_that_cannot_be_imported_is_one_line_and_exit_2(
    sqlite_vault: Vault, name: str, text: str | None, expected: str
) -> None:
    """Usage errors about the file: exit 2, one `relay: ...` line, and nothing written."""
    path = sqlite_vault.directory / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    result = sqlite_vault.relay("cards", "import", str(path))
    assert (2, "", expected.format(path=path) + "\n") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )
    assert [] == sqlite_vault.cards()


def test_a_configuration_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Without RELAY_VAULT_* the command says which variables are missing, in one line."""
    path = tmp_path / "cards.csv"
    path.write_text(HEADER + "\n", encoding="utf-8")
    result = run_relay(base_env(), "cards", "import", str(path))
    assert 2 == result.returncode
    expected = (
        "relay: invalid configuration: RELAY_VAULT_URL or RELAY_VAULT_URL_FILE is required; "
        "RELAY_VAULT_KEK_FILE is required; RELAY_VAULT_FINGERPRINT_KEY_FILE is required; "
        "RELAY_VAULT_AUDIT_KEY_FILE is required"
    )
    assert [expected] == result.stderr.splitlines()


def test_grant_and_revoke_round_trip(sqlite_vault: Vault) -> None:
    """Grant adds a merchant once, revoke removes it once; list shows each state."""
    path = sqlite_vault.write("cards.csv", "\n".join([HEADER, f"card-1,{VISA},12,2031,,,m1"]))
    sqlite_vault.relay("cards", "import", str(path))
    steps = [
        ("grant", "granted card-1 to merchant m2", ["m1", "m2"]),
        ("grant", "unchanged: card-1 was already granted to merchant m2", ["m1", "m2"]),
        ("revoke", "revoked merchant m2's grant on card-1", ["m1"]),
        ("revoke", "unchanged: merchant m2 had no grant on card-1", ["m1"]),
    ]
    seen = []
    for action, _, _ in steps:
        result = sqlite_vault.relay("cards", action, "card-1", "m2")
        seen.append((action, result.stdout.strip(), sqlite_vault.cards()[0]["merchants"]))
        assert (0, "") == (result.returncode, result.stderr)
    assert steps == seen


@pytest.mark.parametrize("action", ["grant", "revoke"])
def test_an_unknown_card_is_card_not_found(sqlite_vault: Vault, action: str) -> None:
    """Granting or revoking on a card_ref the vault does not hold: exit 1 and CARD_NOT_FOUND."""
    path = sqlite_vault.write("cards.csv", "\n".join([HEADER, f"card-1,{VISA},12,2031,,,m1"]))
    sqlite_vault.relay("cards", "import", str(path))
    result = sqlite_vault.relay("cards", action, "card-0", "m1")
    assert (1, "", "relay: card not found (CARD_NOT_FOUND)\n") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )


def test_a_card_number_is_refused_as_an_id_argument(sqlite_vault: Vault) -> None:
    """An id argument that is a card number is a usage error, and argparse does not echo it."""
    result = sqlite_vault.relay("cards", "grant", VISA, "m1")
    assert 2 == result.returncode
    assert "argument CARD_REF: card_ref must not contain a card number" in result.stderr


async def test_rotate_key_generate_moves_every_card_to_a_new_version(any_vault: Vault) -> None:
    """--generate appends version 2; every card is re-wrapped under it and still opens."""
    path = any_vault.write("cards.csv", MIXED_CSV)
    any_vault.relay("cards", "import", str(path))
    result = any_vault.relay("cards", "rotate-key", "--generate")
    assert (0, "") == (result.returncode, result.stderr)
    assert [
        "added KEK version 2 to RELAY_VAULT_KEK_FILE",
        "rewrapped 3 keys; current KEK version 2",
    ] == result.stdout.splitlines()
    assert [1, 2] == sorted(read_keyring(any_vault.config.kek_file))
    assert [2, 2, 2] == [card["key_version"] for card in any_vault.cards()]
    again = any_vault.relay("cards", "rotate-key")
    assert "rewrapped 0 keys; current KEK version 2\n" == again.stdout
    async with await open_vault(any_vault.config) as vault:
        card = await vault.load_card("good-visa", "m1")
    assert Pan(VISA) == card.pan


def test_an_empty_audit_chain_verifies(any_vault: Vault) -> None:
    """No record yet is a healthy chain."""
    result = any_vault.relay("cards", "audit", "verify")
    assert (0, "audit chain ok: 0 records\n", "") == (
        result.returncode,
        result.stdout,
        result.stderr,
    )


async def test_audit_verify_reports_the_first_edited_record(sqlite_vault: Vault) -> None:
    """Three records verify; after one is edited in the database, verify exits 1 naming it."""
    async with await open_vault(sqlite_vault.config) as vault:
        for number in range(3):
            entry = AuditEntry("m1", "card-1", f"req-{number}", "cc", "tt", "success", "")
            await vault.record_attempt(entry)
    assert "audit chain ok: 3 records\n" == sqlite_vault.relay("cards", "audit", "verify").stdout
    drop_audit_guards(sqlite_vault.config)
    run_sql(sqlite_vault.config, "UPDATE audit_log SET outcome = 'failure' WHERE seq = 2")
    result = sqlite_vault.relay("cards", "audit", "verify")
    problem = "seq 2: the hash does not match the entry's contents"
    expected = f"audit chain broken at record 2: {problem}\n"
    assert (1, expected) == (result.returncode, result.stdout)


def generated_csv(path: Path, count: int) -> Path:
    """A CSV of count Luhn-valid generated cards (not test PANs), written line by line."""
    with path.open("w", encoding="utf-8") as out:
        out.write(HEADER + "\n")
        for index in range(count):
            out.write(f"gen-{index:06d},{generated_pan(index)},{index % 12 + 1},2031,,,m1\n")
    return path


def read_terminal(master: int, process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """Everything the child wrote to the pseudo-terminal, until it closes it."""
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        try:
            data = os.read(master, 65536) if ready else b""
        except OSError:  # EIO: the child has exited and closed its side
            break
        if ready and not data:
            break
        chunks.append(data)
        if not ready and process.poll() is not None:
            break
    return b"".join(chunks)


def test_a_terminal_gets_a_bar_redrawn_in_place(sqlite_vault: Vault) -> None:
    """With stderr on a terminal the import draws one bar line, ending at the full count."""
    path = generated_csv(sqlite_vault.directory / "bulk.csv", 1000)
    master, slave = pty.openpty()
    with subprocess.Popen(
        [str(RELAY), "cards", "import", "--batch-size", "100", str(path)],
        env=sqlite_vault.env,
        stdout=subprocess.PIPE,
        stderr=slave,
    ) as process:
        os.close(slave)
        terminal = read_terminal(master, process, timeout=60).decode()
        stdout = process.communicate(timeout=60)[0].decode()
    os.close(master)
    frames = [frame.strip() for frame in terminal.split("\r\x1b[K") if frame.strip()]
    assert frames
    assert re.fullmatch(r"\[##########\]  1,000/1,000 cards  [\d,]+/s", frames[-1]), frames[-1]
    assert (1000, 0, 0, 1000) == summary_counts(stdout)


# --- CVV retention ------------------------------------------------------------------------------


def test_cards_list_shows_the_cvv_policy_before_the_table(sqlite_vault: Vault) -> None:
    """The first line of the table output names the policy and max age in force."""
    sqlite_vault.relay("cards", "import", str(sqlite_vault.write("cards.csv", MIXED_CSV)))
    default = sqlite_vault.relay("cards", "list")
    keep_env = sqlite_vault.env | {
        "RELAY_VAULT_CVV_POLICY": "keep",
        "RELAY_VAULT_CVV_MAX_AGE": "600",
    }
    keep = run_relay(keep_env, "cards", "list")
    assert [0, 0] == [default.returncode, keep.returncode]
    first_two = default.stdout.splitlines()[:2]
    assert "CVV policy: delete-after-use, max age 86400 s" == first_two[0]
    assert first_two[1].startswith("CARD_REF")
    assert "CVV policy: keep, max age 600 s" == keep.stdout.splitlines()[0]


def test_purge_cvv_deletes_the_expired_cvvs_and_reports_the_count(any_vault: Vault) -> None:
    """Only the CVV of a card stored longer than the max age ago goes; a re-run finds none."""
    any_vault.relay("cards", "import", str(any_vault.write("cards.csv", MIXED_CSV)))
    run_sql(
        any_vault.config,
        "UPDATE cards SET created_at = ? WHERE card_ref = ?",
        ("2020-01-01T00:00:00.000000Z", "good-amex"),
    )
    first = any_vault.relay("cards", "purge-cvv")
    again = any_vault.relay("cards", "purge-cvv")
    assert (0, "purged 1 CVVs stored 86400 s or more ago\n", "") == (
        first.returncode,
        first.stdout,
        first.stderr,
    )
    assert "purged 0 CVVs stored 86400 s or more ago\n" == again.stdout
    flags = {card["card_ref"]: card["has_security_code"] for card in any_vault.cards()}
    assert {"good-amex": False, "good-jcb": False, "good-visa": True} == flags


# --- the audit chain of admin actions, and its export --------------------------------------------


def exported(vault: Vault, *filters: str) -> list[dict[str, object]]:
    """`relay cards audit export` with filters: the records it wrote, parsed."""
    result = vault.relay("cards", "--operator", "auditor", "audit", "export", *filters)
    assert (0, "") == (result.returncode, result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines()]


def admin_records(records: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [(r["reason"], r["actor"], r["detail"]) for r in records if r["outcome"] == "admin"]


def test_every_admin_action_is_exported_with_its_operator(any_vault: Vault) -> None:
    """import, grant, revoke, rotate-key, list and export each leave a record naming who ran it."""
    path = any_vault.write("mixed.csv", MIXED_CSV)
    any_vault.relay("cards", "--operator", "alice", "import", str(path))
    any_vault.relay("cards", "--operator", "bob", "grant", "good-jcb", "m9")
    any_vault.relay("cards", "--operator", "bob", "revoke", "good-jcb", "m9")
    any_vault.relay("cards", "--operator", "alice", "rotate-key")
    any_vault.relay("cards", "list")
    first = any_vault.relay("cards", "--operator", "carol", "audit", "export")
    records = exported(any_vault)
    assert [
        ("import", "alice", "created=3 unchanged=0 rejected=6"),
        ("grant", "bob", "changed=1"),
        ("revoke", "bob", "changed=1"),
        ("rotate_key", "alice", "rewrapped=0 version=1"),
        ("list", getpass.getuser(), "shown=3"),
        ("export", "carol", "format=jsonl exported=5"),
    ] == admin_records(records)
    assert len(first.stdout.splitlines()) == 5
    assert [("m9", "good-jcb")] * 2 == [
        (r["merchant_id"], r["card_ref"]) for r in records if r["reason"] in {"grant", "revoke"}
    ]
    assert "audit chain ok: 7 records\n" == any_vault.relay("cards", "audit", "verify").stdout


def test_an_export_line_holds_every_field_and_its_link(sqlite_vault: Vault) -> None:
    """Each line is one record: seq, at, every entry field, prev_hash and hash, in seq order."""
    sqlite_vault.relay("cards", "list")
    sqlite_vault.relay("cards", "list")
    first, second = exported(sqlite_vault)
    keys = {"seq", "at", "prev_hash", "hash", *(f.name for f in dataclasses.fields(AuditEntry))}
    assert (keys, keys, 1, 2) == (set(first), set(second), first["seq"], second["seq"])
    assert first["hash"] == second["prev_hash"]


async def seed_dated_records(vault: Vault) -> None:
    """Four records on fixed days of 2025: two merchants, three outcomes."""
    now = [dt.datetime(2025, 1, 1, tzinfo=dt.UTC)]
    async with await open_vault(vault.config, clock=lambda: now[0]) as opened:
        await opened.record_attempt(AuditEntry("m1", "card-1", "r1", "cc1", "tt1", "success", ""))
        now[0] = now[0].replace(month=2)
        await opened.record_refusal("PERMISSION_DENIED", "merchant:m2", merchant_id="m2")
        now[0] = now[0].replace(month=3)
        await opened.record_attempt(AuditEntry("m1", "card-1", "r2", "cc2", "", "failure", "X"))
        now[0] = now[0].replace(month=4)
        await opened.record_attempt(AuditEntry("m2", "card-2", "r3", "cc3", "tt3", "success", ""))


@pytest.mark.parametrize(
    ("filters", "seqs"),
    [
        ((), [1, 2, 3, 4]),
        (("--since", "2025-02-01T00:00:00Z", "--until", "2025-04-01T00:00:00+00:00"), [2, 3]),
        (("--since", "2025-03-01"), [3, 4]),
        (("--until", "2025-02-01T01:00:00+02:00"), [1]),
        (("--merchant", "m1"), [1, 3]),
        (("--outcome", "refused"), [2]),
        (("--merchant", "m2", "--outcome", "success"), [4]),
    ],
    ids=["none", "range", "since-date", "until-zone", "merchant", "outcome", "both"],
)
async def test_export_filters_select_records(
    sqlite_vault: Vault, filters: tuple[str, ...], seqs: list[int]
) -> None:
    """Time range (since inclusive, until exclusive), merchant and outcome filters combine."""
    await seed_dated_records(sqlite_vault)
    records = exported(sqlite_vault, *filters)
    assert seqs == [r["seq"] for r in records]
    [export] = admin_records(exported(sqlite_vault, "--outcome", "admin"))
    assert ("export", "auditor") == export[:2]
    assert str(export[2]).endswith(f"exported={len(seqs)}")


@pytest.mark.parametrize(
    ("flag", "value", "error"),
    [
        ("--since", "last tuesday", "--since must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z"),
        ("--until", "2025-13-01", "--until must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z"),
        ("--outcome", "deleted", "--outcome must be one of admin, failure, refused, replayed"),
        ("--merchant", "m 1", "--merchant: "),
    ],
    ids=["since", "until", "outcome", "merchant"],
)  # fmt: skip
def test_a_bad_export_filter_is_one_line_and_exit_2(
    sqlite_vault: Vault, flag: str, value: str, error: str
) -> None:
    """A filter the export cannot use is one line on stderr, exit 2, and no record written."""
    result = sqlite_vault.relay("cards", "audit", "export", flag, value)
    assert (2, "", 1) == (result.returncode, result.stdout, len(result.stderr.splitlines()))
    assert result.stderr.startswith(f"relay: cards audit export: {error}")
    assert [] == exported(sqlite_vault)


def test_since_after_until_is_refused(sqlite_vault: Vault) -> None:
    """An empty range is a mistake, not an empty export."""
    result = sqlite_vault.relay(
        "cards", "audit", "export", "--since", "2025-02-01", "--until", "2025-01-01"
    )
    expected = "relay: cards audit export: --since must be before --until\n"
    assert (2, expected) == (result.returncode, result.stderr)


def test_a_bad_operator_is_refused_before_anything_runs(sqlite_vault: Vault) -> None:
    """--operator follows the merchant id rules; a bad one is a usage error, exit 2."""
    result = sqlite_vault.relay("cards", "--operator", "a b", "list")
    assert 2 == result.returncode
    assert [] == exported(sqlite_vault)
