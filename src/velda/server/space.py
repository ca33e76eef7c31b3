"""Riding out a full disk.

A write that finds no space (SQLite's "database or disk is full", an ENOSPC) is rolled back
whole. What must not be lost, an attempt's exit above all, is kept here in memory and written
again every second until it fits; meanwhile the server starts no new work and says why.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
from collections.abc import Callable, Hashable
from pathlib import Path

log = logging.getLogger("velda.server")
RETRY_S = 1.0
ROOM_BYTES = 256 * 1024  # free space that counts as "space is back" when nothing waits


def is_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno == errno.ENOSPC


def no_space(e: OSError, home: Path) -> str:
    """One line for the user: where there is no space."""
    return f"no space left on the device holding {e.filename or home}"


class Space:
    def __init__(self, home: Path, on_room: Callable[[], None]) -> None:
        self.home = home
        self.on_room = on_room  # space is back: start what waited
        self.full: str | None = None  # why new work is refused, while the disk is full
        self._waiting: dict[Hashable, Callable[[], None]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def note_full(self, e: OSError) -> None:
        if self.full is None:
            log.warning("%s: new work waits until there is space", no_space(e, self.home))
        self.full = no_space(e, self.home)
        self._arm()

    def keep(self, key: Hashable, write: Callable[[], None], e: OSError) -> None:
        """`write` found the disk full: do it again, in order, once there is space. The first
        write kept under a key wins (an attempt's first reported exit is its exit)."""
        self._waiting.setdefault(key, write)
        self.note_full(e)

    def waiting(self) -> int:
        return len(self._waiting)

    def wrote(self) -> None:
        """A write went through: if nothing else waits, the disk has room again."""
        if self.full is not None and not self._waiting:
            self._room()

    def _arm(self) -> None:
        if self._timer is not None:
            return
        try:
            self._timer = asyncio.get_running_loop().call_later(RETRY_S, self._retry)
        except RuntimeError:
            pass  # no loop: nothing retries (tests of pure steps)

    def _retry(self) -> None:
        self._timer = None
        for key, write in list(self._waiting.items()):
            try:
                write()
            except OSError as e:
                if is_full(e):
                    self.note_full(e)
                    return
                log.exception("a write kept for a full disk failed: %s", key)
            except Exception:
                log.exception("a write kept for a full disk failed: %s", key)
            self._waiting.pop(key, None)
        if self._has_room():
            self._room()
        else:
            self._arm()

    def _has_room(self) -> bool:
        try:
            return shutil.disk_usage(self.home).free >= ROOM_BYTES
        except OSError:
            return False

    def _room(self) -> None:
        if self.full is not None:
            log.info("there is space again on the device holding %s", self.home)
        self.full = None
        self.on_room()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
