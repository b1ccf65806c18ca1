"""`relay demo` as a user runs it: a subprocess that starts three more, prints a table, exits 0.

The demo's process tree is watched through /proc while it runs, so a test can tell which
`relay ... serve` children it started and whether any of them outlives it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from relay.cards import CARD_TYPE_NAMES
from relay.logging import scrub_text
from tests.cards_testdata import TEST_PANS, assert_no_test_pans

DEMO_TIMEOUT = 120.0
SERVERS = ("flexsim serve", "merchant serve", "pci serve")
TOKEN_LIFETIME = 900
_RATE_LINE = re.compile(
    r"^(?P<ok>\d+) tokens \((?P<failed>\d+) failed\) in (?P<seconds>[\d.]+) s: "
    r"(?P<rate>[\d.]+) tokens/s, p50 (?P<p50>[\d.]+) ms, p99 (?P<p99>[\d.]+) ms$",
    re.MULTILINE,
)
_CLAIMS_HEADER = re.compile(
    r"^decoded transient token claims \((?P<card_ref>[^)]+)\):$", re.MULTILINE
)


@dataclasses.dataclass(frozen=True, repr=False)
class DemoCard:
    """A row of pci_side/demo_cards.csv as the demo must show it: masked only."""

    card_ref: str
    masked_pan: str
    type_name: str

    def __repr__(self) -> str:
        """Only masked facts."""
        return f"DemoCard({self.card_ref}, {self.masked_pan})"


def demo_cards() -> list[DemoCard]:
    """The demo's cards from the PCI side's packaged CSV, with the facts a table may show."""
    text = resources.files("pci_side").joinpath("demo_cards.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    # The leak scan knows the test PANs only: every demo card must be one of them.
    assert [] == [row["card_ref"] for row in rows if row["pan"] not in TEST_PANS]
    return [
        DemoCard(
            row["card_ref"],
            "X" * (len(row["pan"]) - 4) + row["pan"][-4:],
            CARD_TYPE_NAMES[row["type"]],
        )
        for row in rows
    ]


# --- The demo's process tree, through /proc ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; (pid, start time) names it even if the pid is reused."""

    pid: int
    started: str
    command: str

    def alive(self) -> bool:
        """Whether this very process still runs (a zombie does not)."""
        stat = _stat(self.pid)
        return stat is not None and stat[2] == self.started and stat[1] != "Z"

    def role(self) -> str:
        """Which `relay` server it is, or its command line."""
        return next((name for name in SERVERS if name in self.command), self.command)


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(ppid, state, start time) of pid, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> list[Proc]:
    """Every live process below root."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append(int(entry.name))
    found: list[Proc] = []
    todo = [root]
    while todo:
        for pid in parents.get(todo.pop(), []):
            stat = _stat(pid)
            if stat is not None:
                found.append(Proc(pid, stat[2], _command(pid)))
                todo.append(pid)
    return found


def listening_ports(pid: int) -> set[int]:
    """The TCP ports pid listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = str(fd.readlink())
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text(encoding="ascii").splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Demo:
    """A `relay demo` subprocess, its output, and every descendant seen while it ran."""

    def __init__(self, *args: str) -> None:
        """Start it in its own session and watch its process tree every 10 ms."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        self.seen: dict[tuple[int, str], Proc] = {}
        self.stdout = self.stderr = ""
        self._lock = threading.Lock()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    @property
    def output(self) -> str:
        """stdout and stderr."""
        return self.stdout + "\n\n\n" + self.stderr

    def children(self) -> list[Proc]:
        """Descendants seen so far."""
        with self._lock:
            return list(self.seen.values())

    def server(self, role: str, timeout: float = 60.0) -> Proc:
        """The descendant that is role, once it exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            found = [proc for proc in self.children() if proc.role() == role and proc.alive()]
            if found:
                return found[0]
            time.sleep(0.01)
        pytest.fail(f"relay demo never ran {role}", pytrace=False)

    def wait(self, timeout: float = DEMO_TIMEOUT) -> int:
        """Wait for the exit and collect the output."""
        try:
            self.stdout, self.stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.stdout, self.stderr = self.process.communicate()
            pytest.fail(f"relay demo ran over {timeout} s", pytrace=False)
        finally:
            self._watcher.join(5)
        return self.process.returncode

    def leftovers(self, grace: float = 2.0) -> list[str]:
        """Roles of descendants still running grace seconds after the demo exited."""
        deadline = time.monotonic() + grace
        while (alive := [p for p in self.children() if p.alive()]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return sorted(proc.role() for proc in alive)

    def kill_leftovers(self) -> None:
        """SIGKILL, by pid, any descendant of this demo that is still running."""
        for proc in self.children():
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    def _watch(self) -> None:
        while self.process.poll() is None:
            for proc in descendants(self.process.pid):
                # Between fork and exec a child shows its parent's command line: keep the last.
                with self._lock:
                    if proc.command or (proc.pid, proc.started) not in self.seen:
                        self.seen[proc.pid, proc.started] = proc
            time.sleep(0.01)


@contextlib.contextmanager
def demo(*args: str) -> Iterator[Demo]:
    """Run `relay demo ARGS`; whatever it leaves running is killed afterwards."""
    run = Demo(*args)
    try:
        yield run
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.wait()
        run.kill_leftovers()


def assert_no_card_numbers(output: str) -> None:
    """No test PAN, and no Luhn-valid run of 13 to 19 digits at all, in output."""
    assert_no_test_pans(output, "relay demo output")
    assert scrub_text(output) == output


# --- The table ------------------------------------------------------------------------------------


def table_rows(stdout: str) -> dict[str, tuple[str, str, str, str]]:
    """card_ref -> (masked PAN, type, TT jti prefix, expires in), cut at the header's columns."""
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("card_ref "))
    labels = ("card_ref", "masked PAN", "type", "TT jti", "expires in")
    starts = [header.index(label) for label in labels]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    rows = {}
    for line in lines:
        if line.startswith("demo-"):
            ref, *cells = (line[start:end].strip() for start, end in bounds)
            rows[ref] = (cells[0], cells[1], cells[2], cells[3])
    return rows


def claims_block(stdout: str) -> tuple[str, dict[str, object]]:
    """The card_ref and the claims of the decoded token the demo prints."""
    match = _CLAIMS_HEADER.search(stdout)
    assert match is not None, "no decoded claims block"
    claims, _ = json.JSONDecoder().raw_decode(stdout, match.end() + 1)
    assert isinstance(claims, dict)
    return match["card_ref"], claims


def test_demo_tokenizes_every_card_and_shows_only_masked_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """relay demo exits 0 with every demo card masked in its table, claims and a rate line."""
    with demo() as run:
        returncode = run.wait()
        leftovers = run.leftovers()
    assert_no_card_numbers(run.output)
    assert 0 == returncode, scrub_text(run.output)[-3000:]
    cards = demo_cards()
    rows = table_rows(run.stdout)
    assert {c.card_ref: (c.masked_pan, c.type_name) for c in cards} == {
        ref: (masked, kind) for ref, (masked, kind, _, _) in rows.items()
    }
    assert all(int(row[3].removesuffix(" s")) in range(800, 901) for row in rows.values())
    card_ref, claims = claims_block(run.stdout)
    card = next(c for c in cards if c.card_ref == card_ref)
    number = claims["content"]["paymentInformation"]["card"]["number"]  # type: ignore[index]
    assert card.masked_pan == number["maskedValue"]
    assert TOKEN_LIFETIME == claims["exp"] - claims["iat"]  # type: ignore[operator]
    assert rows[card_ref][2] == f"{claims['jti']!s:.20}..."
    # One receipt, checked against the PCI side's public key, for one of the tokens shown.
    verified = re.findall(
        r"^receipt verified: request_id=\S+ tt_jti=(\S+)$", run.stdout, re.MULTILINE
    )
    assert 1 == len(verified)
    assert f"{verified[0]:.20}..." in {row[2] for row in rows.values()}
    rate = _RATE_LINE.search(run.stdout)
    assert rate is not None, "no tokens/s line"
    assert (len(cards), 0) == (int(rate["ok"]), int(rate["failed"]))
    assert sorted(SERVERS) == sorted({proc.role() for proc in run.children()} & set(SERVERS))
    assert [] == leftovers
    with capsys.disabled():
        print(f"\nrelay demo: {rate.group()}")


@pytest.mark.parametrize("group", [False, True], ids=["demo-only", "process-group"])
def test_sigint_while_tokenizing_stops_every_child(group: bool) -> None:
    """Ctrl-C in the middle of the token stream: exit 130, no traceback, no child left."""
    with demo("--rounds", "100") as run:
        gateway = run.server("merchant serve")
        deadline = time.monotonic() + 30
        while not listening_ports(gateway.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listening_ports(gateway.pid), "the gateway never listened"
        time.sleep(1.0)  # the demo is now streaming its 1,200 requests
        assert run.process.poll() is None
        if group:  # as a terminal does: the demo and its children all get it
            os.killpg(run.process.pid, signal.SIGINT)
        else:
            run.process.send_signal(signal.SIGINT)
        returncode = run.wait(timeout=60)
        leftovers = run.leftovers()
    assert_no_card_numbers(run.output)
    assert (130, "") == (returncode, run.stdout)
    assert "Traceback" not in run.stderr
    assert sorted(SERVERS) == sorted({proc.role() for proc in run.children()} & set(SERVERS))
    assert [] == leftovers


def test_sigint_while_the_gateway_starts_stops_every_child() -> None:
    """Ctrl-C while the gateway process is still starting: exit 130, no child left behind."""
    with demo() as run:
        starting = run.server("merchant serve")
        # Past the spawn (the demo holds the child by now), before it listens (~0.4 s here).
        # The gateway is started last: while the demo stops the other two, an orphaned gateway
        # would log its start into a pipe still open and then live on (an orphan that first
        # writes after the demo is gone dies of the broken pipe, which would hide the leak).
        time.sleep(0.1)
        assert not listening_ports(starting.pid)
        run.process.send_signal(signal.SIGINT)
        returncode = run.wait(timeout=60)
        leftovers = run.leftovers()
    assert_no_card_numbers(run.output)
    assert 130 == returncode
    assert "Traceback" not in run.stderr
    assert [] == leftovers
