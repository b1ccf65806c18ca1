"""The three parties as real processes, for tests of promises under faults.

A test gets a `Parties` (the `parties` fixture): certificates, keys and a seeded SQLite vault
in a temp dir, the simulator it was given, and methods to start PciRelay and gateways as `relay`
child processes (relay.dev.procs.Child), kill or stop them, and read the audit chain from the
vault's own file. Outcomes are counted where they are recorded: the audit chain (one `success`
record per tokenization) and what each gateway answered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc

from pci_side.vault import StoredAuditEntry, open_vault
from relay.config import VaultSettings
from relay.dev import stack
from relay.dev.procs import Child
from relay.pb.v1 import merchant_gateway_pb2, merchant_gateway_pb2_grpc
from tests.cards_testdata import assert_no_test_pans
from tests.integration.conftest import KEY_ID, MERCHANT_ID, SECRET_B64, FlexSim

WAIT_SECONDS = 60.0
"""The bound on any wait for an event: generous, only there so a broken build fails."""


class Parties:
    """A temp dir of secrets, a seeded vault, a simulator, and the children started on them."""

    def __init__(self, tmp: Path, sim: FlexSim, *, vault_url: str | None = None) -> None:
        """Use `await Parties.create(...)`."""
        self.sim = sim
        self.files = stack._write_secrets(tmp, None)
        Path(self.files["shared_secret"]).write_text(SECRET_B64 + "\n", encoding="utf-8")
        self.env = stack._env(self.files, sim.url)
        self.env.update(
            RELAY_FLEX_MERCHANT_ID=MERCHANT_ID,
            RELAY_FLEX_KEY_ID=KEY_ID,
            RELAY_PCI_RATE_PER_SECOND="10000",
            RELAY_PCI_RATE_BURST="10000",
        )
        if vault_url is not None:
            self.env["RELAY_VAULT_URL"] = vault_url
        self.tmp = tmp
        self.card_refs: list[str] = []
        self.children: list[Child] = []

    @classmethod
    async def create(cls, tmp: Path, sim: FlexSim, *, vault_url: str | None = None) -> Parties:
        """Write the secrets and seed the vault with the demo cards (granted to the merchant)."""
        parties = cls(tmp, sim, vault_url=vault_url)
        parties.card_refs = await stack._seed(parties.env)
        return parties

    async def start_pci(self, *, port: int = 0) -> Child:
        """A `relay pci serve` on port (0: a free one)."""
        return await self._start("pci", ["pci", "serve", "--port", str(port)], self.env)

    async def start_gateway(self, pci: int, *, ledger_url: str, port: int = 0) -> Child:
        """A `relay merchant serve` in front of the PciRelay on port pci."""
        env = dict(self.env)
        env.update(
            RELAY_MERCHANT_PCI_TARGET=f"127.0.0.1:{pci}", RELAY_MERCHANT_LEDGER_URL=ledger_url
        )
        return await self._start("merchant", ["merchant", "serve", "--port", str(port)], env)

    def gateway(self, child: Child) -> merchant_gateway_pb2_grpc.MerchantGatewayStub:
        """A stub on a mutually authenticated channel to that gateway, as a merchant app."""
        local = stack.LocalStack(
            port_of(child),
            self.card_refs,
            Path(self.files["ca"]),
            Path(self.files["app_cert"]),
            Path(self.files["app_key"]),
        )
        return merchant_gateway_pb2_grpc.MerchantGatewayStub(local.gateway_channel())  # type: ignore[no-untyped-call]

    async def audit(self) -> list[StoredAuditEntry]:
        """Every record of the audit chain, read from the vault's database."""
        settings = VaultSettings.from_env(self.env)
        async with await open_vault(settings.vault) as vault:
            rows, seq = [], 0
            while batch := await vault._store.audit_after(seq, 1000):
                rows.extend(batch)
                seq = batch[-1].seq
            assert (await vault.verify_audit()).ok
            return rows

    async def unfinished(self) -> list[StoredAuditEntry]:
        """The started records that have no outcome (attempts a crash cut short)."""
        settings = VaultSettings.from_env(self.env)
        async with await open_vault(settings.vault) as vault:
            return await vault.unfinished_attempts()

    async def cards(self, *args: str) -> tuple[int, str]:
        """Run `relay cards ARGS` against the vault; its exit code and stdout."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay.cli", "cards", *args,
            env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert_no_test_pans(out.decode() + err.decode(), "relay cards output")
        assert process.returncode is not None
        return process.returncode, out.decode()

    async def stop_all(self) -> None:
        """SIGTERM every child still running; check that nothing printed a test PAN."""
        for child in self.children:
            await child.stop()
            assert_no_test_pans("\n".join(child.lines), f"{child.name} output")

    async def _start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        child = await Child.start(name, args, ready_event=f"{name}_listening", env=env)
        self.children.append(child)
        return child


def port_of(child: Child) -> int:
    """The port a server child logged in its listening line."""
    return int(child.ready.result()["port"])


def kill(child: Child) -> None:
    """kill -9: no drain, no goodbye."""
    with contextlib.suppress(ProcessLookupError):
        child.process.kill()


def events(lines: Iterable[str], name: str) -> list[dict[str, Any]]:
    """The JSON log lines whose event is name."""
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
    return found


async def wait_until(what: str, condition: Any, *, within: float = WAIT_SECONDS) -> None:
    """Poll condition (a callable, maybe async) until true; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def successes(rows: Iterable[StoredAuditEntry]) -> collections.Counter[str]:
    """Tokenizations per request_id: the audit chain's success records."""
    return collections.Counter(
        row.entry.request_id for row in rows if row.entry.outcome == "success"
    )


def issued_jti(rows: Iterable[StoredAuditEntry]) -> dict[str, str]:
    """The transient token's jti of each request_id's success record."""
    return {
        row.entry.request_id: row.entry.tt_jti for row in rows if row.entry.outcome == "success"
    }


def request(request_id: str, card_ref: str) -> merchant_gateway_pb2.TokenRequest:
    """One item for RequestToken(s)."""
    return merchant_gateway_pb2.TokenRequest(request_id=request_id, card_ref=card_ref)


class Bulk:
    """One RequestTokens stream: items are sent on demand, answers collected as they come."""

    def __init__(self, stub: merchant_gateway_pb2_grpc.MerchantGatewayStub) -> None:
        """Open the call; `send` items, `finish` to half-close and collect the rest."""
        self._queue: asyncio.Queue[merchant_gateway_pb2.TokenRequest | None] = asyncio.Queue()
        self.call = stub.RequestTokens(self._requests())
        self.answers: dict[str, merchant_gateway_pb2.TokenResult] = {}
        self.sent = 0
        self._reader = asyncio.create_task(self._read())

    def send(self, items: Iterable[merchant_gateway_pb2.TokenRequest]) -> None:
        """Queue items for sending."""
        for item in items:
            self.sent += 1
            self._queue.put_nowait(item)

    async def finish(self) -> grpc.StatusCode:
        """Half-close, wait for the call to end; its status code."""
        self._queue.put_nowait(None)
        await self._reader
        return await self.call.code()

    def cancel(self) -> None:
        """Abandon the call, as a caller that goes away does."""
        self.call.cancel()

    def tokens(self) -> dict[str, str]:
        """The jti answered for each request_id that got a token."""
        return {
            rid: answer.token.jti
            for rid, answer in self.answers.items()
            if answer.WhichOneof("outcome") == "token"
        }

    def reasons(self) -> collections.Counter[str]:
        """How many answers carried each error reason ("" for a token)."""
        return collections.Counter(
            answer.error.reason if answer.WhichOneof("outcome") == "error" else ""
            for answer in self.answers.values()
        )

    async def _requests(self) -> AsyncIterator[merchant_gateway_pb2.TokenRequest]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def _read(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for answer in self.call:
                self.answers[answer.request_id] = answer
