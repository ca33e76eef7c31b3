"""What a user at a terminal sees: the Ctrl-C question of vbatch -f, watch's progress bar."""

from __future__ import annotations

import os
import pty
import select
import time
from pathlib import Path

from velda_cli import Velda, default_signals


class Terminal:
    """A command on a real pseudo-terminal, as if typed in a shell."""

    def __init__(self, velda: Velda, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            default_signals()  # however the suite was started
            os.chdir(velda.cwd)
            os.execvpe(argv[0], list(argv), velda.env)
        self.screen = b""

    def expect(self, text: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, f"never saw {text!r} in {self.screen!r}"
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.screen += os.read(self.fd, 4096)
                except OSError:
                    break

    def _drain(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            if not data:
                return
            self.screen += data

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._drain()  # what it wrote just before it ended
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._drain()
            time.sleep(0.05)
        raise AssertionError("the command did not end")


def test_ctrl_c_of_vbatch_follow_asks_and_cancels(velda: Velda, tmp_path: Path) -> None:
    term = Terminal(velda, "vbatch", "-f", "--name", "asked", "bash", "-c",
                    "echo ready; sleep 600")
    term.expect(b"ready")
    term.type(b"\x03")  # Ctrl-C
    term.expect(b"Cancel the task")
    term.type(b"y\n")
    term.wait()
    assert velda.wait("asked", timeout=30)["status"] == "CANCELLED"


def test_ctrl_c_of_vbatch_follow_answered_no_detaches(velda: Velda) -> None:
    term = Terminal(velda, "vbatch", "-f", "--name", "kept", "bash", "-c",
                    "echo ready; sleep 600")
    term.expect(b"ready")
    term.type(b"\x03")
    term.expect(b"Cancel the task")
    term.type(b"\n")
    term.expect(b"keeps running")
    assert term.wait() == 130
    assert velda.get("kept")["status"] == "RUNNING"
    velda.run("velda", "task", "cancel", "kept", check=True)


def test_watch_draws_a_progress_bar_on_a_terminal(velda: Velda) -> None:
    parent = velda.vbatch("bash", "-c", "for i in 1 2 3 4; do vbatch sleep 0.2; done")
    term = Terminal(velda, "velda", "task", "watch", parent)
    term.expect(b"4/4 done: 4 succeeded")
    assert term.wait() == 0
    assert b"\r\x1b[K[" in term.screen
    assert b"[##############################] 4/4 done" in term.screen
