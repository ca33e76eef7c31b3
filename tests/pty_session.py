"""A command on a real pseudo-terminal, driven as a user at a terminal would, and the scenarios
of `vrun` at a terminal that every pool that gives terminals passes (test_terminal.py on local
pools, test_ray_pools.py on Ray, test_slurm_pools.py on Slurm)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import time
import uuid

from velda_cli import Velda, default_signals


class Terminal:
    """A command on a real pseudo-terminal, as if typed in a shell (after `velda.prefix`)."""

    def __init__(self, velda: Velda, *argv: str, env: dict[str, str] | None = None) -> None:
        argv = (*velda.prefix, *argv)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            default_signals()  # however the suite was started
            os.chdir(velda.cwd)
            os.execvpe(argv[0], list(argv), {**velda.env, **(env or {})})
        self.resize(30, 100)
        self.screen = b""

    def resize(self, rows: int, cols: int) -> None:
        """As a terminal window does: the command's group gets SIGWINCH."""
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, text: bytes, timeout: float = 30, times: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.screen.count(text) < times:
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
        raise AssertionError(f"the command did not end; its terminal showed {self.screen!r}")


def ends_with(term: Terminal, code: int, timeout: float = 30) -> None:
    """The command under the terminal exits with `code`; else say what the terminal showed."""
    got = term.wait(timeout)
    assert got == code, f"exit {got}, not {code}; its terminal showed {term.screen[-2000:]!r}"


ASK_TERMINAL = ("import os, sys; "
                "print(sys.stdin.isatty(), sys.stdout.isatty(), os.get_terminal_size())")
PROMPT = b"# " if os.geteuid() == 0 else b"$ "  # how a shell's prompt ends, with any rc file
ON_RESIZE = """
import os, signal, time
signal.signal(signal.SIGWINCH, lambda *_: print("resized", tuple(os.get_terminal_size())))
print("ready", tuple(os.get_terminal_size()), flush=True)
time.sleep(30)
"""


def vrun_has_a_terminal(velda: Velda, *pool: str) -> None:
    name = f"tty-{uuid.uuid4().hex[:8]}"
    term = Terminal(velda, "vrun", *pool, "--name", name, "python3", "-c", ASK_TERMINAL)
    term.expect(b"True True os.terminal_size(columns=100, lines=30)")
    ends_with(term, 0)
    task = velda.wait(name)
    assert task["terminal"] == {"rows": 30, "cols": 100}
    assert "True True" in velda.log(name).stdout  # the session is the task's log


def typed_input_reaches_a_shell_and_its_exit_code_comes_back(velda: Velda, *pool: str) -> None:
    term = Terminal(velda, "vrun", *pool, env={"SHELL": "/bin/bash"})
    term.expect(PROMPT)  # keys typed before the shell has set its terminal up may be lost
    term.type(b"echo $((6 * 7)) $(tty)\r")
    term.expect(b"42 /dev/pts/")
    term.type(b"exit 3\r")
    ends_with(term, 3)


def a_window_resize_reaches_the_task(velda: Velda, *pool: str) -> None:
    term = Terminal(velda, "vrun", *pool, "python3", "-c", ON_RESIZE)
    term.expect(b"ready (100, 30)")
    term.resize(40, 120)
    term.expect(b"resized (120, 40)")
    term.type(b"\x03")  # Ctrl-C is the task's terminal's own: SIGINT to the task
    ends_with(term, 130)


def a_terminal_task_survives_a_killed_server(velda: Velda, *pool: str) -> None:
    term = Terminal(velda, "vrun", *pool, "bash", "--norc", "-i", env={"PS1": "$ "})
    term.type(b"echo one$((1))\r")
    term.expect(b"one1")
    velda.kill_server()
    velda.run("velda", "task", "list", check=True)  # a new server, which adopts the task
    term.type(b"echo two$((2))\r")
    term.expect(b"two2", timeout=60)
    term.type(b"exit 4\r")
    ends_with(term, 4, timeout=60)
