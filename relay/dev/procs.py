"""Child relay processes: start one, wait for its ready log line, stop it with SIGTERM.

Each party runs as its own process, as deployed; the demo and the tests drive them this way.
The child's JSON log lines are kept (already scrubbed by its own logging pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from relay.errors import RelayError


class ChildFailed(RelayError):
    """A child process exited or stayed silent before it was ready."""

    reason = "CHILD_FAILED"


class Child:
    """A running `relay ...` subprocess and the log lines it wrote."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, ready_event: str) -> None:
        """Wrap a started process; use Child.start."""
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._ready_event = ready_event
        self._reader = asyncio.create_task(self._read(), name=f"{name}-stderr")

    @classmethod
    async def start(
        cls,
        name: str,
        args: Sequence[str],
        *,
        ready_event: str,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Child:
        """Run `relay ARGS`, and return once it logs ready_event (whose fields are .ready)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.cli",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
        child = cls(name, process, ready_event)
        try:
            await asyncio.wait_for(asyncio.shield(child.ready), timeout)
        except (TimeoutError, ChildFailed):
            await child.stop()
            tail = " | ".join(child.lines[-3:])
            raise ChildFailed(f"{name} did not become ready: {tail}") from None
        except BaseException:
            # Cancelled (Ctrl-C) while waiting: the child must not outlive us as an orphan.
            await asyncio.shield(child.stop())
            raise
        return child

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait for the drain, SIGKILL if it overstays; returns the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader
        return self.process.returncode if self.process.returncode is not None else -1

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.lines.append(line)
            if not self.ready.done():
                event = _event(line)
                if event.get("event") == self._ready_event:
                    self.ready.set_result(event)
        if not self.ready.done():
            self.ready.set_exception(ChildFailed(f"{self.name} exited"))
            self.ready.exception()


def _event(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
