"""The local engine's terminal keepers (terminal_host.py): starting them, and holding an
attempt's end back until its keeper has copied the last of the terminal's output to the log,
so that a `vrun` following the log sees all of it before it sees the exit."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

from velda.engines import terminal_host
from velda.engines.base import EngineError, Launch
from velda.engines.pids import start_time

_HOST = terminal_host.__file__
_WAIT_S = terminal_host.DRAIN_S + 1.0  # its own deadline, and a margin


class Keepers:
    def __init__(self) -> None:
        # attempt dir -> (keeper pid, whether it is our child)
        self._by_dir: dict[Path, tuple[int, bool]] = {}

    def start(self, master: int, launch: Launch, command_pid: int) -> int:
        """A keeper of the terminal whose master side is `master`, in a session of its own,
        appending to the attempt's stdout log; `command_pid` is the task's wrapper."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        sock_path = launch.attempt_dir / terminal_host.SOCKET
        argv = [sys.executable, "-I", "-S", _HOST, str(sock_path), str(command_pid)]
        try:
            with terminal_host.listen(sock_path) as listener:
                pid = os.posix_spawn(argv[0], argv, {}, setsid=True, file_actions=[
                    (os.POSIX_SPAWN_DUP2, master, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(launch.stdout_path), flags, 0o600),
                    (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
                ])
        except OSError as e:
            raise EngineError(f"cannot start the task's terminal: {e.strerror or e}") from e
        self._by_dir[launch.attempt_dir] = (pid, True)
        return pid

    def adopt(self, attempt_dir: Path, pid: object, started: object) -> None:
        """A keeper that an earlier server started, if it still runs."""
        if isinstance(pid, int) and start_time(pid) == started:
            self._by_dir[attempt_dir] = (pid, False)

    def after_drained(self, attempt_dir: Path, report: Callable[[], None]) -> None:
        """report() once the attempt's keeper has ended (at once if it has none), and at
        the latest after its own deadline."""
        pid, own_child = self._by_dir.pop(attempt_dir, (0, False))
        fd = _pidfd(pid) if pid else None
        if fd is None:
            _reap(pid, own_child)
            report()
            return
        loop = asyncio.get_running_loop()
        reported = False

        def report_once() -> None:
            nonlocal reported
            if not reported:
                reported = True
                report()

        def ended() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            _reap(pid, own_child)
            report_once()

        loop.add_reader(fd, ended)
        loop.call_later(_WAIT_S, report_once)  # it is reaped whenever it ends


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _reap(pid: int, own_child: bool) -> None:
    if pid and own_child:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
