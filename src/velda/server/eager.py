"""Run a coroutine at once, up to its first wait; the rest of it goes on as a task.

What Python 3.12's eager tasks do, for 3.11. The scheduling pass that joins the engines'
reports (runtime.py) hands its attempts over this way: the local engine spawns them within
the same turn of the event loop as the commit that started them, instead of a turn later
(a local start never waits); a remote engine's start goes on as a task from its first wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any

log = logging.getLogger("velda.server")


def start_now(job: Coroutine[Any, Any, None],
              later: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """Run `job` until it first waits, then hand the rest to `later` (which makes it a task).
    An error raised before that wait is logged, as a task's would be."""
    try:
        waiting_on = job.send(None)
    except StopIteration:
        return
    except Exception:
        log.exception("a job started at once failed")
        return
    later(_rest(job, waiting_on))


async def _rest(job: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    await _Resumed(job, waiting_on)


class _Resumed:
    """A coroutine already past its first step, driven on by the task that awaits this:
    what it waits on goes up to that task, and what the task sends or throws (a cancel) goes
    down to it, as `await` itself would do."""

    def __init__(self, job: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self.job, self.waiting_on = job, waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        waiting_on = self.waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as e:  # a cancel: passed down
                try:
                    waiting_on = self.job.throw(e)
                except StopIteration:
                    return
            else:
                try:
                    waiting_on = self.job.send(sent)
                except StopIteration:
                    return
