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

`join`: more work for the group's transaction, once its reports are written: the scheduling
pass that an exit asked for (runtime.py), so that an exit and the start it makes room for
are one commit, not two. It gives what to do once the transaction is committed, or rolled
back; should it fail itself, the reports are written again without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from velda.server.space import is_full

log = logging.getLogger("velda.server")

Write = Callable[[], None]


@dataclass(frozen=True)
class Joined:
    """Work written in a group's transaction: what follows its commit, or its rollback."""
    committed: Callable[[], None]
    rolled_back: Callable[[], None]


def _nothing() -> None:
    """No work joins the reports."""
    return None


class _JoinFailed(Exception):
    """The joined work failed (and gave back what it took): the reports go without it."""


class GroupCommit:
    def __init__(self, transaction: Callable[[], AbstractContextManager[None]],
                 keep: Callable[[Hashable, Write, OSError], None],
                 join: Callable[[], Joined | None] = _nothing) -> None:
        self.transaction = transaction  # one store transaction (nested ones join it)
        self.keep = keep  # a write that found the disk full, to do again once it fits
        self.join = join
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
        if group:
            self._write(group, self.join)

    def _write(self, group: list[_Report], join: Callable[[], Joined | None]) -> None:
        joined = None
        try:
            with self.transaction():
                for _, write, _ in group:
                    write()
                joined = _joining(join)
        except _JoinFailed:
            self._write(group, _nothing)
            return
        except Exception as e:
            if joined is not None:
                joined.rolled_back()
            self._not_written(group, e)
            return
        for _, _, written in group:
            if written is not None:
                written()
        if joined is not None:
            joined.committed()

    def _not_written(self, group: list[_Report], error: Exception) -> None:
        """On a full disk each report waits for space; else they are written again one at a
        time, so that only the faulty one fails."""
        if isinstance(error, OSError) and is_full(error):
            for key, write, written in group:
                self.keep(key, _then(write, written), error)
        elif len(group) > 1:
            for report in group:
                self._write([report], _nothing)
        else:
            _failed(group[0], error)


_Report = tuple[Hashable, Write, Write | None]  # key, write, what to call once it is written


def _failed(report: _Report, error: Exception) -> None:
    """A report that cannot be written, for another reason than a full disk: said in the
    log, and let go of (`written`), so that it does not keep its engine waiting for good."""
    key, _, written = report
    log.error("an engine's report %s could not be written", key, exc_info=error)
    if written is not None:
        written()


def _joining(join: Callable[[], Joined | None]) -> Joined | None:
    try:
        return join()
    except Exception as e:
        if isinstance(e, OSError) and is_full(e):
            raise  # the reports, too, wait for space
        log.exception("work joined to the reports' transaction failed; they go without it")
        raise _JoinFailed() from e


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
