"""This PciRelay process's heartbeat in the vault, so that replicas can tell a dead one.

A capture context is held by the process whose attempt claimed it (tokenize.py). When the same
request comes back under it with no outcome recorded, the attempt is either still in flight at
its holder, or its holder died with it: only a live holder's attempt may still end, so only a
dead holder's context may be taken over. A process beats every BEAT_SECONDS while it runs and
says goodbye once drained; one silent for DEAD_AFTER_SECONDS is taken for dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Final, Self

import structlog

from pci_side.vault import CardVault
from relay.errors import RelayError

BEAT_SECONDS: Final = 2.0
DEAD_AFTER_SECONDS: Final = 8.0
"""Four beats missed: well past a busy machine's stall, well within a caller's deadline."""
SEND_WITHIN_SECONDS: Final = 5.0
"""A process sends a card only this soon after a beat that got through: well before the
others may take it for dead, even counting a beat that took its time to land."""
_log = structlog.get_logger("pci_side.presence")


def new_instance_id() -> str:
    """A fresh id for one run of a PciRelay process."""
    return "pci-" + secrets.token_hex(8)


class Presence:
    """Beats for instance_id while entered; leaves on a clean exit."""

    def __init__(self, vault: CardVault, instance_id: str) -> None:
        """Beat in vault under instance_id."""
        self._vault = vault
        self.instance_id = instance_id
        self._task: asyncio.Task[None] | None = None
        self._last_beat = float("-inf")
        """Event-loop time at which the last beat that got through was sent."""

    def may_send(self) -> bool:
        """Whether the others still take this process for alive, with room to spare.

        Checked just before a card leaves: a process that stalled, or lost the vault, long
        enough for its contexts to be taken over must not send under them any more.
        """
        return asyncio.get_running_loop().time() - self._last_beat < SEND_WITHIN_SECONDS

    async def __aenter__(self) -> Self:
        """The first beat is written before the process serves."""
        await self._beat()
        self._task = asyncio.create_task(self._beating(), name="pci-presence")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop beating and leave: the caller drained every attempt first."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RelayError):
            await self._vault.leave(self.instance_id)

    async def _beat(self) -> None:
        sent = asyncio.get_running_loop().time()
        await self._vault.beat(self.instance_id)
        self._last_beat = sent

    async def _beating(self) -> None:
        while True:
            await asyncio.sleep(BEAT_SECONDS)
            try:
                await self._beat()
            except RelayError as exc:
                _log.warning("pci_presence_beat_failed", reason=exc.reason)


def instance_of(holder: str) -> str:
    """The process of a context's holder id (`<instance id>/<attempt number>`)."""
    return holder.split("/", 1)[0]


async def holder_alive(vault: CardVault, holder: str) -> bool:
    """Whether the PciRelay process of holder beat recently enough to be running."""
    silent = await vault.silent_for(instance_of(holder))
    return silent is not None and silent < DEAD_AFTER_SECONDS
