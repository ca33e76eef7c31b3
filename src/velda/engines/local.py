"""The local engine: runs each attempt as a process group on this machine.

The server does not stay between the task and its output: a tiny `/bin/sh` wrapper (about a
megabyte, no interpreter) becomes the leader of a new session, runs the command with stdout and
stderr opened straight onto the attempt's log files, and writes the exit status to a file. So a
task keeps running, and its logs and exit status are recorded, while the server is down; the
next server finds it again through `adopt`.

The wrapper reports a command killed by signal N as 128+N, like every shell: velda reads an exit
status above 128 as that signal.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

from velda.engines.base import EngineError, EngineEvents, Handle, Launch, NotStartedError
from velda.engines.pids import start_time
from velda.models import Exit, Pool, Reason, Resources

_WRAPPER = r"""
d=$1
cd "$2" 2>&3 || { echo 126 > "$d/status"; exit 126; }
shift 2
echo $$ > "$d/pid"
trap : INT TERM HUP
( exec "$@" 2>&3 3>&- )
echo $? > "$d/status"
"""
# fd 3 is the task's stderr; the wrapper's own stderr is /dev/null, so that the shell's note
# about a child killed by a signal ("Killed") never lands in the task's stderr. The subshell
# execs the command: one fork per task, as without it; the trap is reset in it.
_SH = shutil.which("sh") or "/bin/sh"


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


def exit_from_status(code: int) -> Exit:
    if 128 < code <= 128 + 64:
        return Exit.from_signal(code - 128)
    return Exit.from_code(code)


def _read_int(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return int(os.read(fd, 64).strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class LocalEngine:
    name = "local"
    places_work = False

    def __init__(self, events: EngineEvents, cpus: float | None, gpus: int | None) -> None:
        self.events = events
        self._capacity = Resources(
            cpus=discover_cpus() if cpus is None else cpus,
            gpus=discover_gpus() if gpus is None else gpus,
        )
        # pidfd -> (task, attempt, pid if it is our child else -1, attempt dir)
        self._watched: dict[int, tuple[str, int, int, Path]] = {}

    def capacity(self) -> Resources:
        return self._capacity

    async def check(self, pool: Pool) -> None:
        need = pool.resources
        if need.gpus > self._capacity.gpus:
            raise EngineError(
                f"pool {pool.name} needs {need.gpus} GPU(s) per task; this machine has "
                f"{self._capacity.gpus} GPU(s) and {self._capacity.cpus:g} CPU(s)"
            )

    async def start(self, launch: Launch) -> Handle:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            pid = os.posix_spawn(
                _SH,
                [_SH, "-c", _WRAPPER, "velda-task", str(launch.attempt_dir), launch.cwd]
                + launch.argv,
                launch.env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(launch.stdout_path), flags, 0o644),
                    (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 3, str(launch.stderr_path), flags, 0o644),
                ],
                setsid=True,
            )
        except OSError as e:
            raise EngineError(f"cannot start {_SH}: {e.strerror}") from e
        handle: Handle = {"pid": pid, "start": start_time(pid), "dir": str(launch.attempt_dir)}
        self._watch(launch, pid, own_child=True)
        self.events.running(launch.task_id, launch.attempt, handle)
        return handle

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        pid = handle.get("pid") or _read_int(launch.attempt_dir / "pid")
        alive = pid is not None and (
            handle.get("start") is None or start_time(pid) == handle.get("start")
        )
        if pid is None and not (launch.attempt_dir / "status").exists():
            raise NotStartedError(task_id)
        if alive and pid is not None and self._watch(launch, pid, own_child=False):
            if "pid" not in handle:
                self.events.running(task_id, attempt, {"pid": pid, "start": start_time(pid)})
            return
        self.events.exited(task_id, attempt, self._read_exit(launch.attempt_dir, None))

    async def signal(self, handle: Handle, signum: int) -> None:
        _killpg(handle, signum)

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        _killpg(handle, signal.SIGCONT)
        _killpg(handle, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace_s, _killpg, handle, signal.SIGKILL)

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        return None  # the scheduler lends local CPUs (Capacity.lendable)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in list(self._watched):
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()

    def _watch(self, launch: Launch, pid: int, own_child: bool) -> bool:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._watched[fd] = (launch.task_id, launch.attempt, pid if own_child else -1,
                             launch.attempt_dir)
        asyncio.get_running_loop().add_reader(fd, self._ended, fd)
        return True

    def _ended(self, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        task_id, attempt, pid, attempt_dir = self._watched.pop(fd)
        wait_status = None
        if pid > 0:
            _, wait_status = os.waitpid(pid, 0)
        self.events.exited(task_id, attempt, self._read_exit(attempt_dir, wait_status))

    @staticmethod
    def _read_exit(attempt_dir: Path, wait_status: int | None) -> Exit:
        code = _read_int(attempt_dir / "status")
        if code is not None:
            return exit_from_status(code)
        if wait_status is not None and os.WIFSIGNALED(wait_status):
            # the wrapper itself was killed (SIGKILL after a cancel's grace period)
            return Exit.from_signal(os.WTERMSIG(wait_status))
        return Exit(None, None, Reason.LOST)


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
