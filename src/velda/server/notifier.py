"""Wakes whoever follows tasks (log followers, event streams, watch) when anything changed."""

from __future__ import annotations

import asyncio


class Notifier:
    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, since: int, timeout: float) -> int:
        """Return once the version is past `since`, or after `timeout` seconds."""
        if self.version == since:
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                pass
        return self.version
