"""After a restart: find every unfinished task again.

Queued tasks queue again; an attempt that was started (or handed to its engine) is adopted
by its engine, which finds it by what the store kept (or, for an engine that places work, by
the attempt's name) and watches it to its end. An attempt that never really started goes
back to the queue with its attempt number, so nothing runs twice; one its engine cannot find
ends `lost` (and retries if it may).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from velda.engines.base import NotStartedError
from velda.models import Exit, Reason, Task, TaskStatus
from velda.server.space import is_full

if TYPE_CHECKING:
    from velda.server.runtime import Runtime

S = TaskStatus
log = logging.getLogger("velda.server")


class Recovery:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.store

    async def run(self) -> None:
        open_tasks = self.store.open_tasks()
        for task in open_tasks:
            if task.status == S.RUNNING:
                self.runtime.hold(task)
        for task in open_tasks:
            await self._recover_safely(task)
        self._recover_blocked(open_tasks)
        self.runtime.changed()
        self.runtime.request_schedule()

    def _recover_blocked(self, open_tasks: list[Task]) -> None:
        """A parent whose `vrun` child is still open waits again, until the `vrun` inside it
        reconnects (and from then on for as long as it follows); this also tells a remote
        engine again, in case its last word never reached the node."""
        for task in open_tasks:
            if task.blocking and task.parent_id is not None:
                now = self.store.get(task.id)
                if now is not None and not now.status.is_final():
                    self.runtime.blocked.submitted(task.id, task.parent_id)

    async def _recover_safely(self, task: Task) -> None:
        """A server starts on a full disk too: what it cannot write yet waits for space."""
        try:
            await self._recover_one(task)
        except OSError as e:
            if not is_full(e):
                raise

            def again() -> None:
                self.runtime.later(self._recover_safely(task))

            self.runtime.space.keep(("recover", task.id), again, e)

    async def _recover_one(self, task: Task) -> None:
        runtime = self.runtime
        if task.status == S.QUEUED and task.submitted_at is None:
            with self.store.transaction():
                runtime.enqueue(task)
            return
        if task.status not in (S.RUNNING, S.QUEUED):
            with self.store.transaction():
                runtime.cascade([task.id])
            return
        try:
            await runtime.engine_of(task.pool).adopt(
                str(task.id), task.attempt, task.handle or {}, runtime.launch_of(task)
            )
        except NotStartedError:
            self._queue_again(task)
            return
        except Exception as e:  # the engine cannot find it again: it must not stay RUNNING
            log.warning("task %s: cannot find it again: %s", task.id, e)
            detail = f"its engine could not find it again after a restart: {e}"
            runtime.exited(str(task.id), task.attempt, Exit(None, None, Reason.LOST, detail))
            return
        now = self.store.get(task.id)
        if now is not None and now.finished_at is None and now.status == S.RUNNING:
            runtime.attempt_runs(now)  # adopted and still running

    def _queue_again(self, task: Task) -> None:
        """The attempt never started (the server died between recording it and the engine
        starting it): it is queued again under the same attempt number."""
        with self.store.transaction():
            self.runtime.unhold(task.id)
            task.attempt -= 1
            task.status, task.submitted_at, task.handle = S.QUEUED, None, None
            self.store.update(task, "attempt", "status", "submitted_at", "handle")
            self.runtime.enqueue(task)
