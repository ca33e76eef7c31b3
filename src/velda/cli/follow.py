"""Following a task: its output to our stdout and stderr, status changes, and Ctrl-C.

The output is read in a background thread, so the main thread stays free to take Ctrl-C at
any moment and act on it (signal the task, cancel it, or detach) without losing bytes.
"""

from __future__ import annotations

import sys
import threading
import time

from velda.cli.common import exit_code_of, how_it_ended
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
        self.last: dict[str, Any] | None = None  # the task as the last status frame had it
        # where the output stands: the attempt, and the stdout and stderr bytes had of it
        self.position = (attempt or 1, 0, 0)
        self.heard = time.monotonic()  # when the server last sent anything
        # Thread.join() interrupted by Ctrl-C can leave is_alive() wrong; an Event cannot.
        self.done = threading.Event()
        # Held while a question waits for its answer: the output stops here, unread (the
        # server keeps it), and follows once it is released, nothing lost or held in memory.
        self.output_lock = threading.Lock()

    def run(self) -> None:
        try:
            self._follow()
        finally:
            self.done.set()

    def _follow(self) -> None:
        """Read the output to its end; a stream broken by a restart of the server is opened
        again where it stopped, for as long as the client retries (VELDA_RETRY_S)."""
        problem: OSError | None = None
        while True:
            try:
                if self._read_stream():
                    break
            except VeldaError as e:
                self.error = e
                return
            except OSError as e:
                problem = e
            if time.monotonic() - self.heard > self.client.retry_s:
                self.error = VeldaError(f"lost the connection to the server: {problem}")
                return
            time.sleep(0.1)
        if self.last is not None and self.last["status"] in _FINAL:
            self.final = self.last
        else:
            self.error = VeldaError("the server closed the stream before the task ended")

    def _read_stream(self) -> bool:
        """Follow the output from `position`; True at its end, False if it broke first."""
        outputs = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        for kind, value in self.client.output(self.task_id, True, self.attempt, self.position):
            self.heard = time.monotonic()
            if kind == "end":
                return True
            if kind == "attempt":
                self.position = (value, 0, 0)
            elif kind == "task":
                if self.on_status and value != self.last:
                    with self.output_lock:  # a status line waits for a question too
                        self.on_status(value)
                self.last = value
            else:
                self._count(kind, len(value))
                if kind in self.streams:
                    with self.output_lock:
                        outputs[kind].write(value)
                        outputs[kind].flush()
        return False

    def _count(self, stream: str, n: int) -> None:
        attempt, stdout, stderr = self.position
        self.position = (attempt, stdout + n, stderr) if stream == "stdout" else (
            attempt, stdout, stderr + n)


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


def _detail(task: dict[str, Any]) -> str:
    """` (timed out after 1s)`, ` (exit, exit 9)`: why a final task ended, if not by success."""
    if task["status"] not in _FINAL or not task.get("reason"):
        return ""
    ended = how_it_ended(task)
    if ended:
        return f" ({ended})"
    code = task.get("exit_code")
    return f" ({task['reason']}" + (f", exit {code}" if code else "") + ")"


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
        self._say(task, f"{self.status}{_detail(task)}")

    @staticmethod
    def _say(task: dict[str, Any], what: str) -> None:
        print(f"task {task['id']}: {what}", file=sys.stderr, flush=True)
