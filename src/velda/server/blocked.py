"""Which running tasks are blocked waiting for a task in their own subtree.

A task is blocked while a client inside it follows one of its descendants: `vrun`,
`vbatch -f`, `velda task log -f` or `velda task watch` run in the task, which the server sees
as a follow stream opened with that task's token. Between a `vrun` submitting its child and
opening the stream, the child's submit-time `blocking` flag stands in for the stream; the same
flag brings the blocked state back after a server restart, until the clients reconnect.

While blocked, a task's CPUs count as free for everyone (as Ray does for a task blocked in
`ray.get`); when it stops waiting it takes them back. Pure bookkeeping: the runtime is told of
every change through `on_change(task_id, blocked)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable


class Blocked:
    def __init__(self, on_change: Callable[[int, bool], None]) -> None:
        self.on_change = on_change
        self._unfollowed: dict[int, int] = {}  # blocking child not yet followed -> its parent
        self._waits: dict[int, int] = {}  # task -> unfollowed blocking children + open streams

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._waits

    def __len__(self) -> int:
        return len(self._waits)

    def tasks(self) -> set[int]:
        return set(self._waits)

    def _add(self, task_id: int, n: int) -> None:
        before = self._waits.get(task_id, 0)
        if before + n > 0:
            self._waits[task_id] = before + n
        else:
            self._waits.pop(task_id, None)
        if (before > 0) != (before + n > 0):
            self.on_change(task_id, before + n > 0)

    def submitted(self, child_id: int, parent_id: int) -> None:
        """A `vrun` (or `vbatch -f`) inside `parent_id` made `child_id` and will follow it."""
        if child_id not in self._unfollowed:
            self._unfollowed[child_id] = parent_id
            self._add(parent_id, 1)

    def ended(self, task_id: int) -> None:
        """`task_id` is final: nobody waits for its start any more."""
        parent_id = self._unfollowed.pop(task_id, None)
        if parent_id is not None:
            self._add(parent_id, -1)

    def _opened(self, waiter_id: int, followed_id: int) -> None:
        self._add(waiter_id, 1)
        if self._unfollowed.get(followed_id) == waiter_id:
            del self._unfollowed[followed_id]  # the stream stands for it from now on
            self._add(waiter_id, -1)

    async def following(
        self, waiter_id: int, followed_id: int, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """`body`, a follow stream of `followed_id` opened from inside `waiter_id`, which is
        blocked for as long as the stream is open."""
        self._opened(waiter_id, followed_id)
        try:
            async for chunk in body:
                yield chunk
        finally:
            self._add(waiter_id, -1)
