"""Group commit: the engines' reports of one event-loop tick written in one transaction.

An engine reports each attempt that starts (`running`) and ends (`exited`). At a few hundred
tasks a second, a transaction for each report made the commit itself (its WAL frames, the
lock) a large part of a task's cost. Reports are cheap to hold for the rest of a tick: the
engines keep what they report until it is written (Ray's `ray.json`, Slurm's and the wrapper's
status files on disk; a task the local engine spawned itself stays a zombie, its exit status
in the kernel, until its exit is committed: `written`), so a server killed before the commit
finds them again when it recovers, as it always did between an exit and its commit. So a
report waits for the end of the tick, and then every report that arrived in it is written,
in order, in one transaction.

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
        self._pending: list[_Report] = []
        self._flush_soon = False

    def add(self, key: Hashable, write: Write, written: Write | None = None) -> None:
        """`write` at the end of this tick, with the others; at once where no loop runs.
        `written`: called once the write is committed, or failed for good (not for a full
        disk: then once it is committed later)."""
        self._pending.append((key, write, written))
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

    def _together(self, group: list[_Report]) -> None:
        try:
            with self.transaction():
                for _, write, _ in group:
                    write()
        except Exception as e:
            if isinstance(e, OSError) and is_full(e):
                for key, write, written in group:
                    self.keep(key, _then(write, written), e)
                return
            for report in group:  # again one by one: only the faulty one fails
                self._one(*report)
            return
        for _, _, written in group:
            if written is not None:
                written()

    def _one(self, key: Hashable, write: Write, written: Write | None) -> None:
        try:
            with self.transaction():
                write()
        except OSError as e:
            if is_full(e):
                self.keep(key, _then(write, written), e)
                return
            log.exception("an engine's report %s could not be written", key)
        except Exception:
            log.exception("an engine's report %s could not be written", key)
        if written is not None:
            written()


_Report = tuple[Hashable, Write, Write | None]  # key, write, what to call once it is written


def _then(write: Write, written: Write | None) -> Write:
    """`write`, and `written` after it, unless it found the disk full (done again later)."""
    if written is None:
        return write

    def both() -> None:
        try:
            write()
        except BaseException as e:
            if not (isinstance(e, OSError) and is_full(e)):
                written()
            raise
        written()

    return both
