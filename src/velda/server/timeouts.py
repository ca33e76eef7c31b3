"""Per-attempt clocks for `--timeout`.

A clock is armed when an attempt really starts (`running`), not when it is handed to an engine:
time in a cluster's queue does not count, and each attempt of a retried task gets the whole
timeout again. It is disarmed when the attempt ends. When one runs out, the runtime records
the stop cause on the task and stops the attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

Expire = Callable[[int, int], Coroutine[Any, Any, None]]


class Timeouts:
    def __init__(self, now: Callable[[], float], expire: Expire) -> None:
        self.now = now
        self.expire = expire
        self._clocks: dict[int, tuple[int, asyncio.TimerHandle]] = {}  # task -> attempt, timer
        self._jobs: set[asyncio.Task[None]] = set()

    def arm(self, task_id: int, attempt: int, started_at: float, timeout_s: float) -> None:
        """Start the attempt's clock from `started_at`, once: arming the same attempt again
        (an adopted one, a second report) keeps the first clock."""
        armed = self._clocks.get(task_id)
        if armed is not None and armed[0] == attempt:
            return
        self.disarm(task_id)
        delay = max(0.0, started_at + timeout_s - self.now())
        timer = asyncio.get_running_loop().call_later(delay, self._ran_out, task_id, attempt)
        self._clocks[task_id] = (attempt, timer)

    def disarm(self, task_id: int) -> None:
        armed = self._clocks.pop(task_id, None)
        if armed is not None:
            armed[1].cancel()

    def armed_for(self, task_id: int) -> int | None:
        """The attempt whose clock runs, if any."""
        armed = self._clocks.get(task_id)
        return None if armed is None else armed[0]

    def close(self) -> None:
        for _, timer in self._clocks.values():
            timer.cancel()
        self._clocks.clear()

    def _ran_out(self, task_id: int, attempt: int) -> None:
        self._clocks.pop(task_id, None)
        job = asyncio.get_running_loop().create_task(self.expire(task_id, attempt))
        self._jobs.add(job)  # keep a reference until it is done
        job.add_done_callback(self._jobs.discard)
