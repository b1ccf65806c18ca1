"""`relay cards ...`: the card vault's operator commands.

`import`, `list`, `grant`, `revoke`, `rotate-key`, `audit verify` and `audit unfinished`.
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
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
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
from pci_side.vault import (
    CARD_REF_CONFLICT,
    CREATED,
    DUPLICATE_CARD,
    UNCHANGED,
    CardSummary,
    CardVault,
    NewCard,
    append_version,
    open_vault,
)
from pci_side.vault.audit import format_at
from relay.cards import CARD_TYPE_NAMES
from relay.config import EnvReader, VaultSettings, log_level
from relay.errors import RelayError
from relay.ids import IdKind, id_problem
from relay.logging import configure_logging
from relay.progress import Progress

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
            tally = asyncio.run(_import_rows(rows, settings, args.batch_size, progress))
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
    rows: Iterable[Row], settings: VaultSettings | None, batch_size: int, progress: Progress
) -> _Tally:
    """Write the valid rows batch by batch, each batch one transaction; report the rest."""
    tally = _Tally()
    batches = _batches(rows, batch_size)
    # The first batch is read before the vault is opened, so a bad header never touches it.
    first = next(batches, [])
    if settings is None:
        for batch in _chain(first, batches):
            _record(batch, {}, tally, progress)
        return tally
    async with await open_vault(settings.vault) as vault:
        for batch in _chain(first, batches):
            _record(batch, await _write(vault, batch), tally, progress)
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
    summaries = _with_vault(lambda vault: vault.list_cards(limit=args.limit, after=args.after))
    if args.json:
        for summary in summaries:
            _out(json.dumps(card_json(summary)))
        return 0
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
    added = _with_vault(lambda vault: vault.grant(args.card_ref, args.merchant_id))
    if added:
        _out(f"granted {args.card_ref} to merchant {args.merchant_id}")
    else:
        _out(f"unchanged: {args.card_ref} was already granted to merchant {args.merchant_id}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    removed = _with_vault(lambda vault: vault.revoke(args.card_ref, args.merchant_id))
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
    report = _with_vault(lambda vault: vault.rotate_key(), settings)
    _out(f"rewrapped {report.rewrapped} keys; current KEK version {report.current_version}")
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
