"""GroupCommit: items queued while a transaction runs go together in the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from pci_side.vault.batching import GroupCommit


class Writer:
    """A write function that holds each batch until released, and notes what it got."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def write(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the transaction failed")
        return [item * 10 for item in items]


async def wait_for_batches(writer: Writer, count: int) -> None:
    while len(writer.batches) < count:
        await asyncio.sleep(0)


async def test_items_queued_during_a_transaction_share_the_next_one_in_order():
    writer = Writer()
    commit = GroupCommit(writer.write)
    first = asyncio.create_task(commit.submit(1))
    await wait_for_batches(writer, 1)
    rest = [asyncio.create_task(commit.submit(item)) for item in (2, 3, 4)]
    await asyncio.sleep(0)
    writer.gate.set()
    assert [10, 20, 30, 40] == [await first, *[await task for task in rest]]
    assert [[1], [2, 3, 4]] == writer.batches


async def test_a_failed_transaction_fails_each_of_its_callers_and_the_next_goes_on():
    writer = Writer()
    writer.fail_next = True
    commit = GroupCommit(writer.write)
    doomed = [asyncio.create_task(commit.submit(item)) for item in (1, 2)]
    await wait_for_batches(writer, 1)
    later = asyncio.create_task(commit.submit(3))
    writer.gate.set()
    for task in doomed:
        with pytest.raises(RuntimeError):
            await task
    assert 30 == await later


async def test_a_caller_that_leaves_still_has_its_item_written():
    writer = Writer()
    commit = GroupCommit(writer.write)
    leaving = asyncio.create_task(commit.submit(7))
    await wait_for_batches(writer, 1)
    leaving.cancel()
    writer.gate.set()
    await commit.drain()
    assert [[7]] == writer.batches
    assert leaving.cancelled()


async def test_a_batch_holds_at_most_max_batch_items():
    writer = Writer()
    writer.gate.set()
    blocker = asyncio.Event()

    async def slow(items: Sequence[int]) -> list[int]:
        await blocker.wait()
        return await writer.write(items)

    commit = GroupCommit(slow, max_batch=2)
    tasks = [asyncio.create_task(commit.submit(item)) for item in range(5)]
    await asyncio.sleep(0)
    blocker.set()
    assert [0, 10, 20, 30, 40] == [await task for task in tasks]
    assert all(len(batch) <= 2 for batch in writer.batches)
    assert list(range(5)) == [item for batch in writer.batches for item in batch]
