"""vrun at a terminal: the task runs under a terminal of its own on its node (SPEC §3.1).

What the task writes to its terminal comes back as its stdout log, followed like any task's
output (follow.py). What the user types goes the other way: this terminal is put in raw mode,
so that every key, Ctrl-C and Ctrl-Z included, is a byte for the task's terminal, whose own
line discipline turns them into signals there; the bytes and window size changes are posted
to the server in order (`POST /api/v1/tasks/{id}/terminal`), which hands them to the engine.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time

from velda.client import Client, VeldaError

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vrun
if TYPE_CHECKING:
    from typing import Any

_DEFAULT_SIZE = (24, 80)
_EOF = b"\x04"  # a terminal's end-of-file character: what Ctrl-D types
_RETRY_S = 0.05  # how often typed input is offered again to a task that has not started


def wanted(choice: str, shards: int | None) -> bool:
    """--tty: yes, no, or auto (a terminal when vrun's stdin and stdout are terminals)."""
    if choice == "auto":
        return shards is None and sys.stdin.isatty() and sys.stdout.isatty()
    return choice == "yes"


def size() -> tuple[int, int]:
    """This terminal's rows and columns, or 24 x 80 where there is none."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            columns, lines = os.get_terminal_size(stream.fileno())
        except (OSError, ValueError):
            continue
        if columns and lines:
            return lines, columns
    return _DEFAULT_SIZE


def user_shell() -> str:
    return os.environ.get("SHELL") or "/bin/sh"


class Relay:
    """Raw mode for this terminal while the task runs, and its keystrokes and size changes to
    the task. A reader thread takes what is typed; a sender thread posts it, in order."""

    def __init__(self, client: Client, task_id: str) -> None:
        self.client, self.task_id = client, task_id
        self.fd = sys.stdin.fileno()
        self.saved: list[Any] | None = None
        self.outbox: queue.Queue[bytes | tuple[int, int] | None] = queue.Queue()
        self.closed = threading.Event()

    def start(self) -> None:
        if os.isatty(self.fd):
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
            signal.signal(signal.SIGWINCH, lambda *_: self.outbox.put(size()))
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._send, daemon=True).start()

    def restore(self) -> None:
        """This terminal as it was (before vrun writes a line of its own, and at the end)."""
        if self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None

    def close(self) -> None:
        self.closed.set()
        self.outbox.put(None)
        self.restore()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:  # a file or pipe at its end (--tty yes): the task sees Ctrl-D
                self.outbox.put(_EOF)
                return
            self.outbox.put(data)

    def _send(self) -> None:
        while (item := self.outbox.get()) is not None:
            typed, resized = bytearray(), None
            while item is not None:  # what queued meanwhile goes in the same request
                if isinstance(item, bytes):
                    typed += item
                else:
                    resized = item
                try:
                    item = self.outbox.get_nowait()
                except queue.Empty:
                    break
            if not self._post(bytes(typed), resized) or item is None:
                return

    def _post(self, data: bytes, resized: tuple[int, int] | None) -> bool:
        """Deliver, waiting while the task has not started; False once it has ended."""
        body: dict[str, object] = {"data": _base64(data)}
        if resized is not None:
            body["size"] = {"rows": resized[0], "cols": resized[1]}
        while not self.closed.is_set():
            try:
                self.client.request("POST", f"/api/v1/tasks/{self.task_id}/terminal", body)
                return True
            except VeldaError as e:
                if e.status != 409 or self._ended():
                    return False
            time.sleep(_RETRY_S)
        return False

    def _ended(self) -> bool:
        try:
            task = self.client.get(self.task_id)
        except VeldaError:
            return True
        return task.get("started_at") is not None and task["status"] != "RUNNING"


def _base64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
