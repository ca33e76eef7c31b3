"""Group commit: the engines' reports of one event-loop tick written in one transaction.

An engine reports each attempt that starts (`running`) and ends (`exited`). At a few hundred
tasks a second, a transaction for each report made the commit itself (its WAL frames, the
lock) a large part of a task's cost. Reports are cheap to hold for the rest of a tick: the
engines keep what they report on disk (the local engine's status file, Ray's `ray.json`,
Slurm's status file), so a server killed before the commit finds them again when it
recovers, as it always did between an exit and its commit. So a report waits for the end of
the tick, and then every report that arrived in it is written, in order, in one transaction.

On a full disk the whole group is rolled back and each report is kept (Space) until it fits.
A report that fails for another reason must not take the others with it: the group is then
written again one report at a time, so that only the faulty one fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager

from velda.server.space import is_full

log = logging.getLogger("velda.server")

Write = Callable[[], None]


class GroupCommit:
    def __init__(self, transaction: Callable[[], AbstractContextManager[None]],
                 keep: Callable[[Hashable, Write, OSError], None]) -> None:
        self.transaction = transaction  # one store transaction (nested ones join it)
        self.keep = keep  # a write that found the disk full, to do again once it fits
        self._pending: list[tuple[Hashable, Write]] = []
        self._flush_soon = False

    def add(self, key: Hashable, write: Write) -> None:
        """`write` at the end of this tick, with the others; at once where no loop runs."""
        self._pending.append((key, write))
        if self._flush_soon:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (tests of pure steps): now
            self.flush()
            return
        self._flush_soon = True

    def flush(self) -> None:
        group, self._pending, self._flush_soon = self._pending, [], False
        if len(group) == 1:
            self._one(*group[0])
        elif group:
            self._together(group)

    def _together(self, group: list[tuple[Hashable, Write]]) -> None:
        try:
            with self.transaction():
                for _, write in group:
                    write()
        except Exception as e:
            if isinstance(e, OSError) and is_full(e):
                for key, write in group:
                    self.keep(key, write, e)
                return
            for key, write in group:  # again one by one: only the faulty one fails
                self._one(key, write)

    def _one(self, key: Hashable, write: Write) -> None:
        try:
            with self.transaction():
                write()
        except OSError as e:
            if not is_full(e):
                log.exception("an engine's report %s could not be written", key)
                return
            self.keep(key, write, e)
        except Exception:
            log.exception("an engine's report %s could not be written", key)
