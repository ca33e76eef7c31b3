"""Following a task: its output to our stdout and stderr, status changes, and Ctrl-C.

The output is read in a background thread, so the main thread stays free to take Ctrl-C at
any moment and act on it (signal the task, cancel it, or detach) without losing bytes.
"""

from __future__ import annotations

import sys
import threading

from velda.cli.common import exit_code_of
from velda.client import Client, VeldaError

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class Follower(threading.Thread):
    def __init__(
        self,
        client: Client,
        task_id: str,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        streams: tuple[str, ...] = ("stdout", "stderr"), attempt: int | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.task_id, self.on_status = client, task_id, on_status
        self.streams, self.attempt = streams, attempt
        self.final: dict[str, Any] | None = None
        self.error: VeldaError | None = None
        # Thread.join() interrupted by Ctrl-C can leave is_alive() wrong; an Event cannot.
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._follow()
        finally:
            self.done.set()

    def _follow(self) -> None:
        outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        last: dict[str, Any] | None = None
        try:
            for kind, value in self.client.output(self.task_id, True, self.attempt):
                if kind == "task":
                    last = value
                    if self.on_status:
                        self.on_status(value)
                elif kind in self.streams:
                    outputs[kind].write(value)
                    outputs[kind].flush()
        except VeldaError as e:
            self.error = e
        except OSError as e:
            self.error = VeldaError(f"lost the connection to the server: {e}")
        if self.error is None and last is not None and last["status"] in _FINAL:
            self.final = last
        elif self.error is None:
            self.error = VeldaError("the server closed the stream before the task ended")


_FINAL = {"SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED"}


def wait_for(follower: Follower, on_interrupt: Callable[[int], bool]) -> int:
    """Wait for the follower to finish; Ctrl-C calls on_interrupt(n) with the count so far,
    which returns True to stop waiting (detach)."""
    interrupts = 0
    follower.start()
    while not follower.done.is_set():
        try:
            follower.done.wait(0.2)
        except KeyboardInterrupt:
            interrupts += 1
            if on_interrupt(interrupts):
                return 130
    if follower.error is not None:
        raise follower.error
    assert follower.final is not None
    return exit_code_of(follower.final)


class StatusPrinter:
    """Prints `task 12: QUEUED -> RUNNING` lines on stderr as the status changes."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.status: str | None = None

    def __call__(self, task: dict[str, Any]) -> None:
        if self.quiet or task["status"] == self.status:
            return
        never_seen_running = self.status in (None, "PENDING", "QUEUED")
        if task["status"] in _FINAL and task.get("started_at") and never_seen_running:
            self._say(task, "RUNNING")  # it ran, if too quickly for us to see it running
        self.status = task["status"]
        detail = ""
        if task["status"] in _FINAL and task.get("reason"):
            code = task.get("exit_code")
            detail = f" ({task['reason']}" + (f", exit {code}" if code else "") + ")"
        self._say(task, f"{self.status}{detail}")

    @staticmethod
    def _say(task: dict[str, Any], what: str) -> None:
        print(f"task {task['id']}: {what}", file=sys.stderr, flush=True)
