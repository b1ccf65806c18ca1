"""`relay cards ...`: the card vault's operator commands.

`import`, `list`, `grant`, `revoke`, `rotate-key`, `audit verify`, `audit unfinished` and
`audit export`. Every action but the read-only audit ones leaves an `admin` record in the audit
chain (after the action, also when an import was cut short), naming the operator: `--operator`,
else the OS user.
Settings come from the environment only (RELAY_VAULT_*, secrets from *_FILE paths), as for every
relay command; the flags are each command's own arguments. Results go to stdout; rejected rows,
progress and logs to stderr. Log lines start at warning unless RELAY_LOG_LEVEL asks for more, so
that the output of an operator's command is the answer, not the vault's bookkeeping.

No traceback reaches the user: a RelayError goes up to `relay`, which prints
`relay: message (REASON)` and exits 1 (2 for ConfigError); anything else is logged by its type
only (a driver's message may quote values) and reported in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import functools
import getpass
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import structlog

from pci_side.cards_import import (
    CardRow,
    Format,
    ImportFileError,
    RejectedRow,
    Row,
    format_for,
    read_lines,
    read_rows,
)
from pci_side.progress import Progress
from pci_side.vault import (
    CARD_REF_CONFLICT,
    CREATED,
    DUPLICATE_CARD,
    UNCHANGED,
    CardSummary,
    CardVault,
    CvvRetention,
    NewCard,
    RotationReport,
    append_version,
    open_vault,
)
from pci_side.vault.audit import OUTCOMES, StoredAuditEntry, format_at
from relay.cards import CARD_TYPE_NAMES
from relay.config import EnvReader, VaultSettings, log_level
from relay.errors import RelayError
from relay.ids import IdKind, id_problem
from relay.logging import configure_logging

T = TypeVar("T")
Command = Callable[[argparse.Namespace], int]

MAX_BATCH = 10_000
MAX_LIMIT = 10_000
_COUNT_CHUNK = 1 << 20
_VAULT_PROBLEMS = {
    CARD_REF_CONFLICT: "card_ref {card_ref} already holds another card in the vault",
    DUPLICATE_CARD: "this card is already in the vault under another card_ref",
}
_log = structlog.get_logger("pci_side.cards")

IMPORT_EPILOG = """\
exit status: 0 when every row is in the vault (created now, or unchanged because it was there
already); 1 when any row was rejected (each is on stderr as `line N: reason`; every valid row
was still written, each with its grants in the same transaction); 2 for a usage or
configuration error (a missing or unreadable file, an unknown format, a bad CSV header, a
RELAY_VAULT_* problem), in which case nothing was written. Re-running a file changes nothing."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `cards` command group to the relay command."""
    cards = commands.add_parser(
        "cards",
        help="the PCI side's card vault: import, list, grants, key rotation, audit",
        description="Operate the card vault named by RELAY_VAULT_URL (or RELAY_VAULT_URL_FILE).",
    )
    cards.add_argument(
        "--operator",
        type=_identifier("merchant_id"),
        metavar="NAME",
        help="who runs the command, for the audit chain (default: the OS user)",
    )
    actions = cards.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_import(actions)
    _add_list(actions)
    _add_grants(actions)
    rotate = actions.add_parser("rotate-key", help="re-wrap every card key under the newest KEK")
    rotate.add_argument(
        "--generate",
        action="store_true",
        help="first append a freshly generated KEK version to RELAY_VAULT_KEK_FILE",
    )
    rotate.set_defaults(func=_guarded(_rotate_key))
    purge = actions.add_parser(
        "purge-cvv",
        help="delete every stored CVV older than RELAY_VAULT_CVV_MAX_AGE (the worker also does)",
    )
    purge.set_defaults(func=_guarded(_purge_cvv))
    audit = actions.add_parser("audit", help="the tokenization audit log")
    audit_actions = audit.add_subparsers(dest="audit_action", required=True, metavar="ACTION")
    verify = audit_actions.add_parser("verify", help="walk the hash chain; exit 1 if broken")
    verify.set_defaults(func=_guarded(_audit_verify))
    unfinished = audit_actions.add_parser(
        "unfinished",
        help="list attempts that were sent to Flex and never recorded an outcome (JSON lines); "
        "exit 1 if there are any",
    )
    unfinished.set_defaults(func=_guarded(_audit_unfinished))
    _add_export(audit_actions)


def _add_export(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = actions.add_parser(
        "export",
        help="write the chain to stdout in seq order, one JSON object a line",
        description="Export audit records with their hashes. Times are ISO 8601; one without a "
        "zone is UTC. --since is inclusive, --until exclusive.",
    )
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="default jsonl")
    export.add_argument("--since", metavar="ISO8601", help="records at or after this time")
    export.add_argument("--until", metavar="ISO8601", help="records before this time")
    export.add_argument("--merchant", metavar="ID", help="records of this merchant_id")
    export.add_argument("--outcome", metavar="OUTCOME", help=", ".join(sorted(OUTCOMES)))
    export.set_defaults(func=_guarded(_audit_export))


def _add_import(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = actions.add_parser(
        "import",
        help="import cards from a CSV or JSON Lines file",
        description="Import cards: CSV with a header row naming card_ref, pan, exp_month, "
        "exp_year and optionally cvv, type, merchants (separated by ; or spaces), or JSON Lines "
        "objects with the same keys. Blank lines and lines starting with # are skipped.",
        epilog=IMPORT_EPILOG,
    )
    run.add_argument("file", type=Path, metavar="FILE")
    run.add_argument("--format", choices=["csv", "jsonl"], help="default: from the extension")
    run.add_argument(
        "--batch-size",
        type=_bounded(1, MAX_BATCH),
        default=500,
        help="rows per transaction (default 500)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the file only: no vault is opened, so cards already in it are not checked",
    )
    run.set_defaults(func=_guarded(_import))


def _add_list(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = actions.add_parser("list", help="list cards, masked, ordered by card_ref")
    show.add_argument("--limit", type=_bounded(1, MAX_LIMIT), default=100, help="default 100")
    show.add_argument(
        "--after", type=_identifier("card_ref"), metavar="CARD_REF", help="start after this"
    )
    show.add_argument("--json", action="store_true", help="JSON Lines instead of a table")
    show.set_defaults(func=_guarded(_list))


def _add_grants(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, help_text, command in (
        ("grant", "allow a merchant to tokenize a card", _grant),
        ("revoke", "withdraw a merchant's grant on a card", _revoke),
    ):
        parser = actions.add_parser(name, help=help_text)
        parser.add_argument("card_ref", type=_identifier("card_ref"), metavar="CARD_REF")
        parser.add_argument("merchant_id", type=_identifier("merchant_id"), metavar="MERCHANT_ID")
        parser.set_defaults(func=_guarded(command))


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high:,}")
        return int(text)

    return parse


def _identifier(kind: IdKind) -> Callable[[str], str]:
    def parse(text: str) -> str:
        # ArgumentTypeError, not ValueError: argparse then prints our text, never the argument.
        problem = id_problem(kind, text)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return text

    return parse


def _guarded(command: Command) -> Command:
    """Turn any unexpected exception into one line and exit 1; RelayErrors go up to `relay`."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (RelayError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  the CLI's last resort: no traceback, no values
            name = type(exc).__name__
            _log.error("cards_command_failed", action=args.action, error=name)
            _err(f"relay: cards {args.action} failed unexpectedly ({name})")
            return 1

    return run


def _configure() -> VaultSettings:
    """Read the vault settings from the environment and start logging."""
    settings = VaultSettings.from_env(os.environ)
    _start_logging(settings.log_level)
    return settings


def _start_logging(level: str) -> None:
    # Quieter than a server unless RELAY_LOG_LEVEL asks: the output is the command's answer.
    configure_logging(level=level if os.environ.get("RELAY_LOG_LEVEL") else "warning")


def _with_vault(
    action: Callable[[CardVault], Awaitable[T]], settings: VaultSettings | None = None
) -> T:
    """Open the vault from the environment, run one action on it, and close it."""
    config = (settings or _configure()).vault

    async def run() -> T:
        async with await open_vault(config) as vault:
            return await action(vault)

    return asyncio.run(run())


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _operator(args: argparse.Namespace) -> str:
    """--operator, else the OS user: who the audit chain names for an admin record."""
    if args.operator:
        return str(args.operator)
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return f"uid:{os.getuid()}"


# --- import ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Tally:
    """Counts for the summary line."""

    created: int = 0
    unchanged: int = 0
    valid: int = 0
    rejected: int = 0
    rows: int = 0


def _import(args: argparse.Namespace) -> int:
    fmt: Format | None = args.format or format_for(args.file.name)
    if fmt is None:
        _err(f"relay: cannot tell the format of {args.file}: use .csv or .jsonl, or --format")
        return 2
    try:
        stream = args.file.open("rb")
    except OSError as exc:
        _err(f"relay: cannot read {args.file}: {exc.strerror or type(exc).__name__}")
        return 2
    with stream:
        settings = None if args.dry_run else _configure()
        if settings is None:
            _start_logging(log_level(EnvReader(os.environ)))
        total = _estimate_rows(stream, fmt) if sys.stderr.isatty() else None
        progress = Progress(sys.stderr, total=total)
        rows = read_rows(read_lines(stream), fmt, today=dt.datetime.now(dt.UTC).date())
        try:
            tally = asyncio.run(
                _import_rows(rows, settings, args.batch_size, progress, _operator(args))
            )
        except ImportFileError as exc:
            _err(f"relay: {args.file}: {exc}")
            return 2
        finally:
            progress.close()
    _out(_summary(tally, progress.elapsed(), dry_run=args.dry_run))
    return 1 if tally.rejected else 0


def _estimate_rows(stream: BinaryIO, fmt: Format) -> int | None:
    """Count the lines of a regular file for the bar's total (blank lines make it a little high)."""
    if not stream.seekable():
        return None
    lines, last = 0, b"\n"
    while chunk := stream.read(_COUNT_CHUNK):
        lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    stream.seek(0)
    lines += last != b"\n"
    return max(lines - (fmt == "csv"), 0)


async def _import_rows(
    rows: Iterable[Row],
    settings: VaultSettings | None,
    batch_size: int,
    progress: Progress,
    operator: str,
) -> _Tally:
    """Write the valid rows batch by batch, each batch one transaction; report the rest.

    The admin record is written once the vault was opened, also when the file turns out bad
    part-way: the batches before that are in the vault.
    """
    tally = _Tally()
    batches = _batches(rows, batch_size)
    # The first batch is read before the vault is opened, so a bad header never touches it.
    first = next(batches, [])
    if settings is None:
        for batch in _chain(first, batches):
            _record(batch, {}, tally, progress)
        return tally
    async with await open_vault(settings.vault) as vault:
        complete = False
        try:
            for batch in _chain(first, batches):
                _record(batch, await _write(vault, batch), tally, progress)
            complete = True
        finally:
            detail = (
                f"created={tally.created} unchanged={tally.unchanged} rejected={tally.rejected}"
            )
            await vault.record_admin(
                "import", operator, detail + ("" if complete else " aborted=1")
            )
    return tally


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chain(first: list[Row], rest: Iterator[list[Row]]) -> Iterator[list[Row]]:
    if first:
        yield first
    yield from rest


async def _write(vault: CardVault, batch: list[Row]) -> dict[int, str]:
    """Import the valid rows of a batch; the vault's status of each, by line number."""
    valid = [row for row in batch if isinstance(row, CardRow)]
    outcomes = await vault.import_cards(
        [NewCard(row.card_ref, row.card, row.merchants) for row in valid]
    )
    return {row.line: outcome.status for row, outcome in zip(valid, outcomes, strict=True)}


def _record(batch: list[Row], statuses: dict[int, str], tally: _Tally, progress: Progress) -> None:
    """Count a written batch and print its rejected rows, in line order."""
    for row in batch:
        problem = row if isinstance(row, RejectedRow) else _vault_problem(row, statuses)
        if problem is not None:
            tally.rejected += 1
            progress.message(str(problem))
        elif isinstance(row, CardRow):
            status = statuses.get(row.line)
            tally.created += status == CREATED
            tally.unchanged += status == UNCHANGED
            tally.valid += 1
    tally.rows += len(batch)
    progress.advance(len(batch))


def _vault_problem(row: CardRow, statuses: dict[int, str]) -> RejectedRow | None:
    status = statuses.get(row.line)
    if status is None or status in {CREATED, UNCHANGED}:
        return None
    text = _VAULT_PROBLEMS.get(status, "the vault did not import this row ({status})")
    return RejectedRow(row.line, text.format(card_ref=row.card_ref, status=status))


def _summary(tally: _Tally, seconds: float, *, dry_run: bool) -> str:
    timing = f"in {seconds:.2f} s ({tally.rows / max(seconds, 1e-9):.0f} cards/s)"
    if dry_run:
        return (
            f"dry run: {tally.valid} valid, {tally.rejected} rejected (of {tally.rows} rows) "
            f"{timing}; nothing written"
        )
    return (
        f"imported: {tally.created} created, {tally.unchanged} unchanged, "
        f"{tally.rejected} rejected (of {tally.rows} rows) {timing}"
    )


# --- list, grant, revoke, rotate-key, audit verify ---------------------------------------------


def _list(args: argparse.Namespace) -> int:
    async def run(vault: CardVault) -> list[CardSummary]:
        summaries = await vault.list_cards(limit=args.limit, after=args.after)
        await vault.record_admin("list", _operator(args), f"shown={len(summaries)}")
        return summaries

    summaries = _with_vault(run)
    if args.json:
        for summary in summaries:
            _out(json.dumps(card_json(summary)))
        return 0
    _out(f"CVV policy: {CvvRetention.of(VaultSettings.from_env(os.environ).vault).describe()}")
    _out(card_table(summaries))
    if len(summaries) == args.limit:
        _err(f"more cards may follow: relay cards list --after {summaries[-1].card_ref}")
    return 0


def card_json(card: CardSummary) -> dict[str, object]:
    """One card as a JSON object: only what PCI DSS allows in clear."""
    return {
        "card_ref": card.card_ref,
        "bin": card.first6,
        "last4": card.last4,
        "masked_pan": _masked(card),
        "card_type": card.card_type,
        "card_type_name": _type_name(card.card_type),
        "exp_month": card.exp_month,
        "exp_year": card.exp_year,
        "has_security_code": card.has_security_code,
        "key_version": card.key_version,
        "merchants": list(card.merchants),
        "created_at": card.created_at.isoformat(),
        "updated_at": card.updated_at.isoformat(),
    }


_TABLE_HEADER = ("CARD_REF", "BIN", "PAN", "TYPE", "EXPIRY", "CVV", "KEK", "MERCHANTS")


def card_table(cards: list[CardSummary]) -> str:
    """Cards as an aligned text table with a header row."""
    rows = [_TABLE_HEADER] + [
        (
            card.card_ref,
            card.first6,
            _masked(card),
            _type_name(card.card_type),
            f"{card.exp_month:02d}/{card.exp_year}",
            "yes" if card.has_security_code else "no",
            str(card.key_version),
            ",".join(card.merchants) or "-",
        )
        for card in cards
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_TABLE_HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _masked(card: CardSummary) -> str:
    # The vault keeps no PAN length in clear, so the mask has a fixed width.
    return "X" * 12 + card.last4


def _type_name(code: str | None) -> str:
    if code is None:
        return "unknown"
    return CARD_TYPE_NAMES.get(code, code)


def _grant(args: argparse.Namespace) -> int:
    async def run(vault: CardVault) -> bool:
        added = await vault.grant(args.card_ref, args.merchant_id)
        await _record_grant_change(vault, args, "grant", changed=added)
        return added

    added = _with_vault(run)
    if added:
        _out(f"granted {args.card_ref} to merchant {args.merchant_id}")
    else:
        _out(f"unchanged: {args.card_ref} was already granted to merchant {args.merchant_id}")
    return 0


async def _record_grant_change(
    vault: CardVault, args: argparse.Namespace, action: str, *, changed: bool
) -> None:
    await vault.record_admin(
        action,
        _operator(args),
        f"changed={int(changed)}",
        merchant_id=args.merchant_id,
        card_ref=args.card_ref,
    )


def _revoke(args: argparse.Namespace) -> int:
    async def run(vault: CardVault) -> bool:
        removed = await vault.revoke(args.card_ref, args.merchant_id)
        await _record_grant_change(vault, args, "revoke", changed=removed)
        return removed

    removed = _with_vault(run)
    if removed:
        _out(f"revoked merchant {args.merchant_id}'s grant on {args.card_ref}")
    else:
        _out(f"unchanged: merchant {args.merchant_id} had no grant on {args.card_ref}")
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    settings = _configure()
    if args.generate:
        version = append_version(settings.vault.kek_file)
        _out(f"added KEK version {version} to RELAY_VAULT_KEK_FILE")
    report = _with_vault(functools.partial(_rotate_and_record, operator=_operator(args)), settings)
    _out(f"rewrapped {report.rewrapped} keys; current KEK version {report.current_version}")
    return 0


async def _rotate_and_record(vault: CardVault, *, operator: str) -> RotationReport:
    report = await vault.rotate_key()
    detail = f"rewrapped={report.rewrapped} version={report.current_version}"
    await vault.record_admin("rotate_key", operator, detail)
    return report


def _purge_cvv(args: argparse.Namespace) -> int:
    async def run(vault: CardVault) -> int:
        purged = await vault.purge_expired_security_codes()
        await vault.record_admin("purge_cvv", _operator(args), f"purged={purged}")
        return purged

    settings = _configure()
    purged = _with_vault(run, settings)
    max_age = settings.vault.cvv_max_age
    _out(f"purged {purged} CVVs stored {max_age} s or more ago")
    return 0


def _audit_unfinished(args: argparse.Namespace) -> int:  # noqa: ARG001  the command signature
    started = _with_vault(lambda vault: vault.unfinished_attempts())
    for stored in started:
        entry = stored.entry
        line = {
            "seq": stored.seq,
            "at": format_at(stored.at),
            "merchant_id": entry.merchant_id,
            "request_id": entry.request_id,
            "card_ref": entry.card_ref,
            "cc_jti": entry.cc_jti,
        }
        _out(json.dumps(line, sort_keys=True))
    return 1 if started else 0


def _audit_verify(args: argparse.Namespace) -> int:  # noqa: ARG001  the command signature
    verdict = _with_vault(lambda vault: vault.verify_audit())
    if verdict.ok:
        _out(f"audit chain ok: {verdict.checked} records")
        return 0
    _out(f"audit chain broken at record {verdict.first_broken}: {verdict.problem}")
    return 1


# --- audit export ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _ExportFilter:
    """Which records an export writes; the empty filter writes them all."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    merchant: str | None = None
    outcome: str | None = None

    def accepts(self, stored: StoredAuditEntry) -> bool:
        """Whether a record passes every filter that is set."""
        entry = stored.entry
        return (
            (self.since is None or stored.at >= self.since)
            and (self.until is None or stored.at < self.until)
            and (self.merchant is None or entry.merchant_id == self.merchant)
            and (self.outcome is None or entry.outcome == self.outcome)
        )

    def detail(self) -> str:
        """The filters as key=value pairs, for the export's own admin record."""
        pairs = {
            "since": None if self.since is None else format_at(self.since),
            "until": None if self.until is None else format_at(self.until),
            "merchant": self.merchant,
            "outcome": self.outcome,
        }
        return " ".join(f"{key}={value}" for key, value in pairs.items() if value is not None)


class _FilterError(ValueError):
    """A filter value the export cannot use; its text is the whole error line."""


def _export_filter(args: argparse.Namespace) -> _ExportFilter:
    since, until = _parse_time("--since", args.since), _parse_time("--until", args.until)
    if since is not None and until is not None and since >= until:
        raise _FilterError("--since must be before --until")
    if args.merchant is not None and (problem := id_problem("merchant_id", args.merchant)):
        raise _FilterError(f"--merchant: {problem}")
    if args.outcome is not None and args.outcome not in OUTCOMES:
        raise _FilterError("--outcome must be one of " + ", ".join(sorted(OUTCOMES)))
    return _ExportFilter(since, until, args.merchant, args.outcome)


def _parse_time(flag: str, text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _FilterError(f"{flag} must be an ISO 8601 time, e.g. 2026-01-31T00:00:00Z") from None
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at


def _export_line(stored: StoredAuditEntry) -> str:
    fields: dict[str, object] = dataclasses.asdict(stored.entry)
    fields.update(
        seq=stored.seq, at=format_at(stored.at), prev_hash=stored.prev_hash, hash=stored.hash
    )
    return json.dumps(fields, sort_keys=True)


async def _export(vault: CardVault, chosen: _ExportFilter, operator: str) -> int:
    """Write the chosen records in seq order; record the export; return how many were written."""
    count = 0
    pages: AsyncIterator[list[StoredAuditEntry]] = vault.audit_pages()
    async for page in pages:
        lines = [_export_line(stored) for stored in page if chosen.accepts(stored)]
        if lines:
            _out("\n".join(lines))
        count += len(lines)
    sys.stdout.flush()
    detail = " ".join(filter(None, ["format=jsonl", chosen.detail(), f"exported={count}"]))
    await vault.record_admin("export", operator, detail)
    return count


def _audit_export(args: argparse.Namespace) -> int:
    try:
        chosen = _export_filter(args)
    except _FilterError as exc:
        _err(f"relay: cards audit export: {exc}")
        return 2
    _with_vault(lambda vault: _export(vault, chosen, _operator(args)))
    return 0
