"""Passes over running attempts, every `interval` seconds on the event loop, that never take
more than `max_share` of it: with very many attempts a pass takes longer and the next one
waits in proportion, instead of starving the server. Used by the log chunk index
(sampler.py) and the usage sampler (usage.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class PacedPasses:
    """Calls `one_pass` (which returns how long it took, in seconds) while `busy()`."""

    def __init__(self, interval: float, max_share: float, one_pass: Callable[[], float],
                 busy: Callable[[], bool]) -> None:
        self.interval = interval
        self.max_share = max_share
        self.one_pass = one_pass
        self.busy = busy
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """There is work: make sure a pass comes (no-op without an event loop, as in tests
        of pure steps, or when one is already due)."""
        if self._timer is None:
            self._arm(self.interval)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        took = self.one_pass()
        if self.busy():
            self._arm(max(self.interval, took / self.max_share))
