"""The reaper: the parent of a background server, which keeps the exit status of every task
the server started itself when the server dies.

A task the server spawns directly (spawn.py, no wrapper) is the server's child: only the
server reads its wait status. `velda server start` therefore starts this small process first,
a child subreaper (`PR_SET_CHILD_SUBREAPER`), which starts the server as its child. If the
server dies (kill -9, a crash, or a stop while tasks run), its tasks become the reaper's
children; the reaper writes each one's `pid` file at once and, when it ends, its `status`
file, as the wrapper would have; the next server finds them as it finds wrapped tasks.

The server tells the reaper, through a pipe, which attempt directory each pid is (`S DIR`
before a spawn, `P PID` after it, `X` when it failed, `E PID` once the server reaped it), and
which of its children is a helper, not a task (`H PID`: server/folder_maker.py). The
end of a task that ends while the server lives is read without reaping it (`WNOWAIT`,
zombie.py), committed to the store with its CPU totals, and only then reaped: a kill between
the two leaves a zombie for the reaper, never a lost status, and no file is written for it.

The reaper passes the server's lock (`server.lock`) to the server and keeps its own copy of
it until it has written the pid files of the tasks a dead server left, so a new server
recovers only after that. Once the server is gone and its tasks have ended, the reaper exits
with the server's exit status.

    python -m velda.engines.reaper LOCK_FILE SERVER_ARGV...
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from velda.engines import zombie
from velda.engines.libc import LIBC
from velda.engines.pids import start_time
from velda.engines.status_file import PID, write_status
from velda.models import Exit

log = logging.getLogger("velda.reaper")

_FD_VAR, _LOCK_VAR = "VELDA_REAPER_FD", "VELDA_LOCK_FD"
_PR_SET_CHILD_SUBREAPER = 36
_PF_EXITING = 0x4  # /proc/PID/stat flags: the process is in exit (before it reparents)
_PIPE_SIZE = 1 << 20
_LOCK_WAIT_S = 5.0
_SPAWN_WAIT_S = 0.2  # for a child the dead server was spawning to open its stdout
_ROUND_S = 0.25  # the pipe is read at least this often: it holds 1 MiB, 15,000 tasks' worth


# --- the server's side


class ReaperLink:
    """The server's end of the pipe to its reaper. `alive` turns False when the reaper is
    gone (the write fails): from then on the engine starts every task through the wrapper."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.alive = True

    def spawning(self, attempt_dir: Path) -> None:
        self._send(b"S %s\n" % os.fsencode(os.path.abspath(attempt_dir)))

    def spawned(self, pid: int) -> None:
        self._send(b"P %d\n" % pid)

    def not_spawned(self) -> None:
        self._send(b"X\n")

    def reaped(self, pid: int) -> None:
        self._send(b"E %d\n" % pid)

    def helper(self, pid: int) -> None:
        self._send(b"H %d\n" % pid)

    def _send(self, line: bytes) -> None:
        if not self.alive:
            return
        try:
            os.write(self.fd, line)
        except OSError as e:
            self.alive = False
            log.warning("the reaper is gone (%s): tasks start through the wrapper from now on",
                        e.strerror)


_link: ReaperLink | None = None
_looked = False


def server_link() -> ReaperLink | None:
    """The link to this server's reaper, when it runs under one (its parent, passing the
    pipe's fd); taken once, and kept from the tasks it starts."""
    global _link, _looked
    if not _looked:
        _looked = True
        fd = _inherited_fd(_FD_VAR)
        if fd is not None and os.getppid() != 1:
            _link = ReaperLink(fd)
    return _link


def inherited_lock() -> int | None:
    """The server lock's fd, already locked by the reaper that started this server."""
    return _inherited_fd(_LOCK_VAR)


def _inherited_fd(var: str) -> int | None:
    value = os.environ.pop(var, "")
    if not value.isdigit():
        return None
    fd = int(value)
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return None
    return fd


# --- the reaper process


@dataclass
class Ending:
    """How an ended child (not yet reaped) of the reaper ended, for its status file."""

    pid: int
    attempt_dir: Path
    exit: Exit  # exact, with its CPU totals (zombie.read_exit)


def settle(ending: Ending) -> bool:
    """Its status file written, then the child reaped. False, and nothing reaped, where the
    file cannot be written yet (a full disk): the zombie keeps its end until it can. Where
    its attempt's folder is gone (the server's home was removed), no server will ever read
    the file: it is reaped all the same, lest the reaper outlive everything for it."""
    try:
        write_status(ending.attempt_dir, ending.exit)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            log.warning("cannot write the status of %s yet: %s", ending.attempt_dir, e)
            return False
        log.warning("%s is gone: the end of its task is not written down", ending.attempt_dir)
    os.waitpid(ending.pid, 0)
    return True


class Reaper:
    def __init__(self, pipe: int, server_pid: int, lock_fd: int | None) -> None:
        self.pipe: int | None = pipe
        self.server_pid = server_pid
        self.server_code: int | None = None  # set once the server ended
        self.lock_fd = lock_fd
        self.buffer = b""
        self.spawned: dict[int, Path] = {}  # pid -> attempt dir, as the server said
        self.intent: Path | None = None  # a spawn under way: S without its P yet
        self.orphans: dict[int, Path] = {}  # the dead server's tasks, now ours
        self.helpers: set[int] = set()  # the server's children that are no task
        self.unsettled: dict[int, Ending] = {}  # ended, status not written yet (disk full)

    def run(self, wake: int) -> int:
        while self.server_code is None or self.orphans or self.unsettled:
            # woken by SIGCHLD only: what the server writes waits in the pipe until it dies,
            # or the next round (so that a task costs the server no wake-up of the reaper)
            select.select([wake], [], [], _ROUND_S)
            _drain(wake)
            self.read_pipe()
            self.reap()
        return self.server_code

    def read_pipe(self) -> None:
        while self.pipe is not None:
            try:
                data = os.read(self.pipe, 65536)
            except BlockingIOError:
                return
            if not data:  # the server is gone
                os.close(self.pipe)
                self.pipe = None
                return
            self.buffer += data
            *lines, self.buffer = self.buffer.split(b"\n")
            for line in lines:
                self._apply(line)

    def _apply(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        if kind == b"S":
            self.intent = Path(os.fsdecode(rest))
        elif kind == b"P" and self.intent is not None:
            self.spawned[int(rest)] = self.intent
            self.intent = None
        elif kind == b"X":
            self.intent = None
        elif kind == b"E":
            self.spawned.pop(int(rest), None)
        elif kind == b"H":
            self.helpers.add(int(rest))

    def reap(self) -> None:
        """Every child that ended: the server, its tasks after it died, and processes that
        tasks left behind (orphaned to us as the nearest subreaper: reaped, nothing more)."""
        for pid, ending in list(self.unsettled.items()):
            if settle(ending):
                del self.unsettled[pid]
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in self.unsettled:
                return  # the others wait until its status can be written
            pid = info.si_pid
            if pid == self.server_pid:
                self.server_died()
            elif pid in self.orphans:
                ending = Ending(pid, self.orphans.pop(pid), zombie.read_exit(pid))
                if not settle(ending):
                    self.unsettled[pid] = ending
            elif self.server_code is None and _exiting(self.server_pid):
                self.server_died()  # its task, reparented to us while it exits
            else:
                os.waitpid(pid, 0)

    def server_died(self) -> None:
        _, status = os.waitpid(self.server_pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.server_code = 128 - code if code < 0 else code  # a signal, as a shell says it
        self.read_pipe()  # the server wrote all it will
        children = _children()
        self.orphans = {pid: d for pid, d in self.spawned.items() if pid in children}
        if self.intent is not None:
            pid = _in_flight(self.intent, children - set(self.orphans) - self.helpers)
            if pid is not None:
                self.orphans[pid] = self.intent
        for pid, attempt_dir in self.orphans.items():
            _write_pid(attempt_dir, pid)
        log.info("velda server %d ended (%s); %d of its tasks still run", self.server_pid,
                 self.server_code, len(self.orphans))
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # a new server may recover now
            self.lock_fd = None


def _exiting(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    fields = stat.rsplit(b")", 1)[1].split()
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & _PF_EXITING)


def _children() -> set[int]:
    """Our children, zombies included, from /proc."""
    me = str(os.getpid()).encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        if stat.rsplit(b")", 1)[1].split()[1] == me:
            found.add(int(entry))
    return found


def _in_flight(attempt_dir: Path, unknown: set[int]) -> int | None:
    """Of our children the server did not name, the one it was spawning when it died: the
    one whose stdout becomes that attempt's (a child killed with its parent in the middle of
    a spawn may not have opened it yet: it is given a moment); else (it ended already, and
    a zombie has no open files) the newest that ended."""
    stdout = str(attempt_dir / "stdout")
    deadline = time.monotonic() + _SPAWN_WAIT_S
    while True:
        for pid in unknown:
            try:
                if os.readlink(f"/proc/{pid}/fd/1") == stdout:
                    return pid
            except OSError:
                continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.005)
    zombies = [pid for pid in unknown if _exiting(pid)]
    return max(zombies, key=lambda pid: start_time(pid) or 0) if zombies else None


def _write_pid(attempt_dir: Path, pid: int) -> None:
    """The pid file, whole or not at all (a new server reads it to adopt the task)."""
    temp = attempt_dir / f".{PID}.reaper"
    try:
        temp.write_text(f"{pid}\n")
        os.replace(temp, attempt_dir / PID)
    except OSError as e:
        log.warning("cannot write the pid of %s: %s", attempt_dir, e)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _take_lock(path: str) -> int | None:
    """The server lock, waiting a little for a reaper still writing what its server left."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.02)


def _become_subreaper() -> None:
    if LIBC is None or LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    lock_path, server_argv = argv[0], argv[1:]
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _become_subreaper()
    lock_fd = _take_lock(lock_path)
    if lock_fd is None:
        print(f"velda: a server already runs for {os.path.dirname(lock_path)}", file=sys.stderr)
        return 1
    pipe, server_end = os.pipe()
    try:
        fcntl.fcntl(server_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # the default (64 KiB) does: the server blocks only if the reaper falls behind
    os.set_blocking(pipe, False)
    wake, wake_end = os.pipe()
    os.set_blocking(wake, False)
    os.set_blocking(wake_end, False)
    signal.set_wakeup_fd(wake_end)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for fd in (server_end, lock_fd):
        os.set_inheritable(fd, True)
    env = {**os.environ, _FD_VAR: str(server_end), _LOCK_VAR: str(lock_fd)}
    server_pid = os.posix_spawn(server_argv[0], server_argv, env)
    os.close(server_end)
    return Reaper(pipe, server_pid, lock_fd).run(wake)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
