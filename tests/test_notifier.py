"""The notifier (server/notifier.py): a follower of one task wakes at that task's changes, not
at the changes of every other task, and never misses one that came while it was reading."""

from __future__ import annotations

import asyncio

import pytest

from velda.server.notifier import Notifier

LONG_S = 30.0  # a wait that would only end by its timeout


async def woken(wait: asyncio.Future[None] | asyncio.Task[None]) -> bool:
    """Whether `wait` ends within a moment (it was woken) rather than by its long timeout."""
    try:
        await asyncio.wait_for(wait, 0.2)
    except TimeoutError:
        return False
    return True


def test_a_follower_wakes_at_its_own_task_changes_only() -> None:
    async def scenario() -> None:
        notifier = Notifier()
        with notifier.watching(1) as one, notifier.watching(2) as two:
            waiting = asyncio.ensure_future(one.wait(LONG_S))
            notifier.bump({2, 3})  # a flood elsewhere
            assert await woken(asyncio.ensure_future(two.wait(LONG_S)))
            assert not await woken(asyncio.shield(waiting))
            notifier.bump({1})
            assert await woken(waiting)

    asyncio.run(scenario())


def test_a_change_while_the_follower_reads_is_not_missed() -> None:
    async def scenario() -> None:
        notifier = Notifier()
        with notifier.watching(7) as watch:
            notifier.bump({7})  # it came before the follower waits again
            assert await woken(asyncio.ensure_future(watch.wait(LONG_S)))
            assert not await woken(asyncio.ensure_future(watch.wait(LONG_S)))  # seen once

    asyncio.run(scenario())


@pytest.mark.parametrize("changed", [None, set()])
def test_a_change_of_unknown_tasks_wakes_every_follower_and_none_when_known_empty(
    changed: set[int] | None,
) -> None:
    async def scenario() -> None:
        notifier = Notifier()
        with notifier.watching(1) as one:
            version = notifier.version
            notifier.bump(changed)
            assert notifier.version == version + 1  # event streams wake at every change
            assert await woken(asyncio.ensure_future(one.wait(LONG_S))) is (changed is None)

    asyncio.run(scenario())
