"""Wakes whoever follows tasks when something changed: an event stream at every change (its
subtree may be anywhere), a follower of one task's output only at that task's changes.

A change of a task is a write of its row (the store notes which: `Store.changes`). Followers
of output wake at their own task's changes, not at each of the thousands a second a flood
makes elsewhere; output itself is looked for every poll, as it always was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Watch:
    """One follower's interest in one task: marked at each change of it until the follower
    waits again, so that a change while it was reading is never missed."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def mark(self) -> None:
        self._changed.set()

    async def wait(self, timeout: float) -> None:
        """Return once the task changed since the last wait (at once, if it did), or after
        `timeout` seconds."""
        if not self._changed.is_set():
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
        self._changed.clear()


class Notifier:
    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()
        self._watches: dict[int, set[Watch]] = {}

    def bump(self, task_ids: Iterable[int] | None = None) -> None:
        """A change; `task_ids`: the tasks whose rows it changed (None: any of them)."""
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()
        if task_ids is None:
            watches = [w for each in self._watches.values() for w in each]
        else:
            watches = [w for task_id in task_ids for w in self._watches.get(task_id, ())]
        for watch in watches:
            watch.mark()

    async def wait(self, since: int, timeout: float) -> int:
        """Return once the version is past `since`, or after `timeout` seconds."""
        if self.version == since:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                pass
        return self.version

    @contextmanager
    def watching(self, task_id: int) -> Iterator[Watch]:
        """A Watch of `task_id`, for as long as the follower follows it."""
        watch = Watch()
        self._watches.setdefault(task_id, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches[task_id]
            watches.discard(watch)
            if not watches:
                del self._watches[task_id]
