"""Fan-ins, paced: a task waiting on thousands of upstreams is read again at most every
`PACE_S`, not at each upstream's end.

Each upstream's end pushes its dependents onto the worklist (runtime.cascade), and each push
reads the dependent's (kind, upstream status) pairs: one SELECT DISTINCT over its whole
dependency list (Store.dependency_states), 0.4 ms for 5,000 upstreams whose rows are in
SQLite's cache, 2 ms where they are not. Read at each of their ends, a fan-in of n upstreams
costs n of those readings, 2 to 10 s of the server's one thread for 5,000, while every other
task waits for that thread.

So a dependent whose reading took `SLOW_S` or more is not read again for `PACE_S` (or 20
times what that reading took, if that is longer): a push meanwhile asks for one step at that
moment, and the pushes until then join it. A dependent read in less than `SLOW_S` (a link of
a chain, a task after a few others: a few µs) is never held back; one that is waits at most
that long after its last upstream ended. Nothing is lost to a restart: recovery steps every
PENDING task. `VELDA_FAN_IN_PACE_FROM_S` sets another `SLOW_S` (0: every dependent).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from velda.config import env_seconds

PACE_S = 0.05
SLOW_S = 0.0001  # 1,000 upstreams or so on the 2-core machine (a chain's link: 6 µs)


class FanIns:
    def __init__(self, step: Callable[[int], None], slow_s: float | None = None,
                 pace_s: float = PACE_S) -> None:
        self._step = step  # steps a held dependent at the end of its pace
        self.slow_s = env_seconds("VELDA_FAN_IN_PACE_FROM_S", SLOW_S) if slow_s is None \
            else slow_s
        self.pace_s = pace_s
        self._not_before: dict[int, float] = {}  # dependents read slowly: monotonic seconds
        self._due: set[int] = set()  # those with a step asked for

    def held(self, task_id: int) -> bool:
        """Was it read less than its pace ago? Then it is stepped once the pace is over."""
        when = self._not_before.get(task_id)
        if when is None:
            return False
        wait = when - time.monotonic()
        if wait <= 0:
            return False
        if task_id not in self._due:
            try:
                asyncio.get_running_loop().call_later(wait, self._step_due, task_id)
            except RuntimeError:  # no loop (tests of pure steps): read it now
                return False
            self._due.add(task_id)
        return True

    def read(self, task_id: int, took: float) -> None:
        """Its dependencies were read, in `took` seconds (`forget` follows if they decided
        it)."""
        if took < self.slow_s:
            self._not_before.pop(task_id, None)
        else:
            self._not_before[task_id] = time.monotonic() + max(self.pace_s, 20 * took)

    def forget(self, task_id: int) -> None:
        """It waits no more (decided, queued, or ended)."""
        self._not_before.pop(task_id, None)

    def _step_due(self, task_id: int) -> None:
        self._due.discard(task_id)
        if self._not_before.pop(task_id, None) is not None:  # still waiting
            self._step(task_id)

    def __len__(self) -> int:
        return len(self._not_before)
