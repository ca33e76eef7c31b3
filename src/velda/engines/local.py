"""The local engine: runs each attempt as a process group on this machine.

The server does not stay between the task and its output. Under a reaper (reaper.py), the
server spawns the command itself (spawn.py), leader of a new session, with stdout and stderr
opened straight onto the attempt's log files; it reads the exit status from the ended process
(zombie.py) and reaps it only once the store has it, and if it dies first, the reaper writes
it to the attempt's status file. Where it
cannot (a terminal, another user, a command only a shell can run, no reaper), the status-file
wrapper of status_file.py (a tiny `/bin/sh` script, no interpreter) runs the command and
writes its status. Either way a task keeps running, and its logs and exit status are
recorded, while the server is down; the next server finds it again through `adopt`. Once a
directly spawned task's end is stored, its folder is offered to the next start, which takes
it if its logs are empty and nothing holds them (spare_folders.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from velda.engines import spawn, zombie
from velda.engines.base import (
    EngineError,
    EngineEvents,
    Handle,
    Launch,
    NotStartedError,
    StartResult,
    start_each,
)
from velda.engines.command_path import CommandPaths
from velda.engines.keepers import Keepers
from velda.engines.pids import boot_ticks, start_time, start_time_since
from velda.engines.reaper import server_link
from velda.engines.run_as import task_user
from velda.engines.spare_folders import SpareFolders
from velda.engines.status_file import (
    PID,
    STATUS,
    WRAPPER,
    exit_from_status,
    read_int,
    read_status,
    unusable_env,
)
from velda.engines.terminal_host import SOCKET, send, set_size
from velda.logindex import INDEX
from velda.models import Exit, Pool, Reason, Resources

_SH = shutil.which("sh") or "/bin/sh"
_STATUS_GRACE_S = 0.5  # for the status of an adopted task reaped just now
# A task starts with every signal at its default action and none blocked, however the server
# was started: a server started by a `vbatch &` in a script inherits SIGINT and SIGQUIT
# ignored, and a non-interactive sh can neither trap nor reset a signal ignored on entry, so
# without this no Ctrl-C through vrun would ever reach a task. The signals the wrapper traps
# are those velda forwards to the command; it must outlive them to write the exit status.
_DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGTSTP,
                    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGALRM)


def discover_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([g for g in visible.split(",") if g.strip() and g.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def discover_cpus() -> float:
    return float(len(os.sched_getaffinity(0)))


def _machine(cpus: float | None, gpus: int | None) -> Resources:
    return Resources(
        cpus=discover_cpus() if cpus is None else cpus,
        gpus=discover_gpus() if gpus is None else gpus,
    )


class LocalEngine:
    name = "local"
    places_work = False
    writes_log_index = False  # the server indexes the files as they grow
    samples_here = True
    gives_terminals = True

    def __init__(self, events: EngineEvents, cpus: float | None, gpus: int | None,
                 spares: SpareFolders | None = None) -> None:
        self.events = events
        self._spares = spares  # where the folders of attempts that printed nothing go
        self._override = (cpus, gpus)
        self._capacity = _machine(cpus, gpus)
        self._watched: dict[int, _Watched] = {}  # by pidfd
        self._reaper = server_link()
        self._keepers = Keepers()
        self._commands = CommandPaths()

    def capacity(self) -> Resources:
        return self._capacity

    def override(self, cpus: float | None, gpus: int | None) -> None:
        """velda.toml's [local] changed: what it says, else what this machine has."""
        if (cpus, gpus) != self._override:
            self._override = (cpus, gpus)
            self._capacity = _machine(cpus, gpus)

    async def check(self, pool: Pool) -> None:
        need = pool.resources
        if need.gpus > self._capacity.gpus:
            raise EngineError(
                f"pool {pool.name} needs {need.gpus} GPU(s) per task; this machine has "
                f"{self._capacity.gpus} GPU(s) and {self._capacity.cpus:g} CPU(s)"
            )

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        if not os.path.isdir(cwd):
            raise EngineError(f"cwd: working directory {cwd} does not exist", "cwd")

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        return await start_each(self, launches)

    async def start(self, launch: Launch) -> Handle:
        before = boot_ticks()
        pid = self._spawn_direct(launch) if self._direct(launch) else None
        if pid is not None:  # so its working directory was there
            handle: Handle = {"pid": pid, "start": start_time_since(pid, before),
                              "dir": str(launch.attempt_dir)}
            self._watch(launch, pid, own_child=True, direct=True)
            self.events.running(launch.task_id, launch.attempt, handle)
            return handle
        if not os.path.isdir(launch.cwd):  # removed since the submit
            raise EngineError(f"working directory {launch.cwd} does not exist")
        argv = [_SH, "-c", WRAPPER, "velda-task", str(launch.attempt_dir), launch.cwd]
        argv, env = self._as_pool_user(launch, argv + launch.argv, _local_env(launch))
        if launch.terminal is None:
            pid = _spawn(argv, env, _to_log_files(launch))
            handle = {"pid": pid, "start": start_time_since(pid, before),
                      "dir": str(launch.attempt_dir)}
        else:
            pid, keeper = self._spawn_with_terminal(launch, argv, env)
            handle = {"pid": pid, "start": start_time(pid), "dir": str(launch.attempt_dir),
                      "keeper": keeper, "keeper_start": start_time(keeper)}
        self._watch(launch, pid, own_child=True)
        self.events.running(launch.task_id, launch.attempt, handle)
        return handle

    def _direct(self, launch: Launch) -> bool:
        """Started without the wrapper: under a reaper that keeps its exit status if the
        server dies, with no terminal and no other user to run as."""
        return (self._reaper is not None and self._reaper.alive and spawn.available()
                and launch.terminal is None and not launch.pool.options.get("user"))

    def _spawn_direct(self, launch: Launch) -> int | None:
        """The command itself, leading a new session; None where it cannot start so (not
        found, not executable, not a binary...): the wrapper then runs it, and says why."""
        assert self._reaper is not None
        env = _local_env(launch)
        path = self._commands.find(launch.argv[0], env.get("PATH", os.defpath), launch.cwd)
        if path is None:
            return None
        self._reaper.spawning(launch.attempt_dir)
        if not self._reaper.alive:  # it just went: nothing would keep this task's status
            return None
        try:
            pid = spawn.spawn(path, launch.argv, env, launch.cwd, _direct_files(launch),
                              _DEFAULT_SIGNALS)
        except OSError:
            self._reaper.not_spawned()
            return None
        except ValueError as e:  # a NUL byte, '=' in a name, a lone surrogate
            self._reaper.not_spawned()
            raise EngineError(unusable_env(env, e)) from e
        self._reaper.spawned(pid)
        return pid

    def _spawn_with_terminal(
        self, launch: Launch, argv: list[str], env: dict[str, str]
    ) -> tuple[int, int]:
        """The wrapper on a new pseudo-terminal (its controlling terminal: it leads a new
        session and opens it first), and the keeper of the terminal's master side."""
        assert launch.terminal is not None
        master, slave = os.openpty()
        try:
            set_size(master, *launch.terminal)
            on_terminal = [
                (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
                (os.POSIX_SPAWN_DUP2, 0, 1),
                (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                (os.POSIX_SPAWN_DUP2, 0, 3),
            ]
            pid = _spawn(argv, env, on_terminal)
            try:
                keeper = self._keepers.start(master, launch, pid)
            except EngineError:  # no one would hold its terminal: it must not run
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        finally:
            os.close(master)
            os.close(slave)
        return pid, keeper

    async def terminal(self, handle: Handle, data: bytes, size: tuple[int, int] | None) -> None:
        if not await send(Path(str(handle.get("dir"))) / SOCKET, data, size):
            raise EngineError("its terminal is closed: the task has ended")

    @staticmethod
    def _as_pool_user(
        launch: Launch, argv: list[str], env: dict[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """The wrapper's argv and environment, switched to the pool's `user` if it has one."""
        try:
            user = task_user(launch.pool)
        except KeyError:
            user_name = launch.pool.options.get("user")
            raise EngineError(f"pool {launch.pool.name}: no user {user_name!r} here") from None
        if user is None:
            return argv, env
        try:
            logs = (launch.stdout_path, launch.stderr_path, launch.attempt_dir / INDEX)
            user.share(launch.attempt_dir, logs)
        except OSError as e:
            raise EngineError(f"cannot prepare {launch.attempt_dir}: {e.strerror}") from e
        return user.prefix() + argv, user.environment(env)

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        pid = handle.get("pid") or read_int(launch.attempt_dir / PID)
        alive = pid is not None and (
            handle.get("start") is None or start_time(pid) == handle.get("start")
        )
        if pid is None and not (launch.attempt_dir / STATUS).exists():
            raise NotStartedError(task_id)
        if alive and pid is not None and self._watch(launch, pid, own_child=False):
            self._keepers.adopt(launch.attempt_dir, handle.get("keeper"),
                                handle.get("keeper_start"))
            if "pid" not in handle:
                self.events.running(task_id, attempt, {"pid": pid, "start": start_time(pid)})
            return
        self.events.exited(task_id, attempt, self._read_exit(launch.attempt_dir, None))

    async def signal(self, handle: Handle, signum: int) -> None:
        _killpg(handle, signum)

    def host_of(self, handle: Handle) -> str:
        return "127.0.0.1"  # the attempt runs on the server's machine

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        _killpg(handle, signal.SIGCONT)
        _killpg(handle, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace_s, _killpg, handle, signal.SIGKILL)

    async def inventory(self, pool: Pool) -> None:
        return None  # this machine's CPUs and GPUs are the server's machine_usage()

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        return None  # a blocked task's CPUs count as free in Runtime.free_capacity

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in list(self._watched):
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()

    def _watch(self, launch: Launch, pid: int, own_child: bool, direct: bool = False) -> bool:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._watched[fd] = _Watched(launch.task_id, launch.attempt, pid, own_child, direct,
                                     launch.attempt_dir)
        asyncio.get_running_loop().add_reader(fd, self._ended, fd)
        return True

    def _ended(self, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        watched = self._watched.pop(fd)
        if watched.direct:
            os.close(fd)
            self.events.exited(watched.task_id, watched.attempt, zombie.read_exit(watched.pid),
                               partial(self._reap, watched.pid, watched.attempt_dir))
            return
        if not watched.own_child:
            self._await_status(watched, fd, None)
            return
        os.close(fd)
        _, wait_status = os.waitpid(watched.pid, 0)
        self._report_exit(watched, wait_status)

    def _reap(self, pid: int, attempt_dir: Path) -> None:
        """Its exit is in the store: the zombie that kept it until then goes (were the
        server killed before, its reaper would write its status file from it), and its
        folder is offered to the next start (spare_folders.py)."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        assert self._reaper is not None
        self._reaper.reaped(pid)
        if self._spares is not None:
            self._spares.offer(attempt_dir)

    def _await_status(self, watched: _Watched, fd: int, gone_at: float | None) -> None:
        """An adopted task that ended: its status is there if its wrapper wrote it, else it
        comes from its parent (the reaper of the server that started it) just before it
        reaps it, or later on a full disk. Once the process is reaped without one, the
        status is lost."""
        if read_status(watched.attempt_dir) is None:
            if gone_at is None and _reaped(fd):
                gone_at = time.monotonic()
            if gone_at is None or time.monotonic() - gone_at < _STATUS_GRACE_S:
                asyncio.get_running_loop().call_later(0.05, self._await_status, watched, fd,
                                                      gone_at)
                return
        os.close(fd)
        self._report_exit(watched, None)

    def _report_exit(self, watched: _Watched, wait_status: int | None) -> None:
        exit = self._read_exit(watched.attempt_dir, wait_status)
        # the end of a terminal's output may still be on its way to the log
        self._keepers.after_drained(
            watched.attempt_dir, lambda: self.events.exited(watched.task_id, watched.attempt,
                                                            exit))

    @staticmethod
    def _read_exit(attempt_dir: Path, wait_status: int | None) -> Exit:
        code = read_status(attempt_dir)
        if code is not None:
            return exit_from_status(code)
        if wait_status is not None and os.WIFSIGNALED(wait_status):
            # the wrapper itself was killed (SIGKILL after a cancel's grace period)
            return Exit.from_signal(os.WTERMSIG(wait_status))
        if wait_status is not None and os.WIFEXITED(wait_status):
            return exit_from_status(os.WEXITSTATUS(wait_status))  # no room for the file
        return Exit(None, None, Reason.LOST)


@dataclass
class _Watched:
    task_id: str
    attempt: int
    pid: int
    own_child: bool
    direct: bool  # spawned without the wrapper: its zombie keeps its end until it is stored
    attempt_dir: Path


def _reaped(pidfd: int) -> bool:
    """Is the process gone for good (reaped), not just ended (a zombie)?"""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return True
    return False


def _direct_files(launch: Launch) -> list[spawn.Open]:
    """stdin empty; stdout and stderr opened onto the log files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return [(0, "/dev/null", os.O_RDONLY, 0), (1, str(launch.stdout_path), flags, 0o600),
            (2, str(launch.stderr_path), flags, 0o600)]


def _local_env(launch: Launch) -> dict[str, str]:
    """The task sees only the GPUs the scheduler gave it, and finds (or starts) the server
    through VELDA_HOME after a restart in which it could not get VELDA_SERVER's port back."""
    env = {**launch.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, launch.gpu_ids))}
    if launch.server_home is not None:
        env["VELDA_HOME"] = str(launch.server_home)
    return env


def _to_log_files(launch: Launch) -> list[tuple[Any, ...]]:
    """stdin empty; stdout, and stderr on fd 3, opened by the server onto the log files,
    before any switch of user; the wrapper's own stderr /dev/null."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    return [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(launch.stdout_path), flags, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 3, str(launch.stderr_path), flags, 0o600),
    ]


def _spawn(argv: list[str], env: dict[str, str], file_actions: Sequence[tuple[Any, ...]]) -> int:
    """The wrapper, leading a new session, with every signal at its default."""
    try:
        return os.posix_spawn(argv[0], argv, env, file_actions=file_actions, setsid=True,
                              setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except OSError as e:
        raise EngineError(f"cannot start {argv[0]}: {e.strerror}") from e
    except ValueError as e:  # a NUL byte, '=' in a name, a lone surrogate
        raise EngineError(unusable_env(env, e)) from e


def _killpg(handle: Handle, signum: int) -> None:
    pid = handle.get("pid")
    if not isinstance(pid, int):
        return
    if handle.get("start") is not None and start_time(pid) != handle.get("start"):
        return  # the process is gone and its pid was reused
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
