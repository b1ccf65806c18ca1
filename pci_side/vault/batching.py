"""Group commit: writes that arrive while one transaction runs go together in the next one.

A SQLite vault has one writer and a synced commit costs milliseconds, so a write per token
would bound the worker at a few hundred tokens a second; grouped, the cost of a commit is
shared by every token waiting for it. Order is kept (FIFO), each caller gets its own result,
and a failed transaction fails every caller in it. A caller cancelled while waiting still has
its item written (it may already be), so what a caller started is never half-known.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741  an item to write
O = TypeVar("O")  # noqa: E741  its result

__all__ = ["GroupCommit"]


class GroupCommit(Generic[I, O]):
    """Batches calls to `write` (one transaction per batch, results in item order)."""

    def __init__(
        self,
        write: Callable[[Sequence[I]], Awaitable[Sequence[O]]],
        *,
        max_batch: int = 256,
        name: str = "vault-group-commit",
    ) -> None:
        """Batch calls to write, which returns one result per item of a batch, in order."""
        self._write = write
        self._max_batch = max_batch
        self._name = name
        self._pending: list[_Pending[I, O]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> O:
        """Queue item and wait until its transaction commits; return its result."""
        future: asyncio.Future[O] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name=self._name)
        return await future

    async def drain(self) -> None:
        """Wait until everything queued so far is written (before closing the store)."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._write([pending.item for pending in batch])
            except asyncio.CancelledError:
                for pending in batch + self._pending:
                    pending.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending(Generic[I, O]):
    item: I
    future: asyncio.Future[O]
