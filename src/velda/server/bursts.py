"""Scheduling waits out a burst of submits.

A scheduling pass starts what fits at once. While a few clients submit short tasks one a
request, a pass after every submit and every exit has one server core answer a submit, start
a task, end one, answer the next submit, in turn: on two cores that kept submits near 1,000 a
second, however fast the submit path alone is. So in a burst (the last `count` submits came
within `window`: faster than a client that waits for each task could send them), a pass
asked for waits `window`: the submits are answered first, and each pass starts together the
tasks that queued meanwhile. Outside a burst a pass comes at once, and a long burst still
gets one every `window`. Slurm's `SchedulerParameters=defer` makes the same trade.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_S = 0.010  # how close together submits make a burst, and how long a pass then waits
COUNT = 8  # ... how many of them


class SubmitBursts:
    def __init__(self, window: float = WINDOW_S, count: int = COUNT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.count = count
        self.clock = clock
        self._times: deque[float] = deque(maxlen=count)  # of the latest submits

    def submitted(self) -> None:
        self._times.append(self.clock())

    def wait(self) -> float:
        """How long a pass asked for now waits: `window` in a burst, else nothing."""
        times = self._times
        if len(times) < self.count:
            return 0.0
        in_burst = times[-1] - times[0] < self.window and self.clock() - times[-1] < self.window
        return self.window if in_burst else 0.0
