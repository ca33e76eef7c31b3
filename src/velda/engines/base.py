"""The engine interface: what places and starts a task's process.

An engine knows nothing of the store, the scheduler or HTTP. The server hands it a `Launch`
(everything needed to run one attempt), keeps the JSON `handle` it returns in the store, and
hears back through `EngineEvents`. Logs are files: the engine makes the attempt's stdout and
stderr land, byte for byte, in `launch.stdout_path` and `launch.stderr_path`.

Engines that place work themselves (Ray, Slurm) set `places_work = True`: the server hands them
a task as soon as its dependencies are met and they report `running` when it really starts.
The local engine sets it to False: velda's scheduler counts its CPUs and GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from velda.models import Exit, Pool, Resources

Handle = dict[str, Any]


@dataclass(frozen=True)
class Launch:
    task_id: str
    attempt: int
    argv: list[str]
    cwd: str
    env: dict[str, str]  # the whole environment of the task, VELDA_* included
    pool: Pool
    gpu_ids: tuple[int, ...]  # GPUs the scheduler gave (local engine); empty elsewhere
    attempt_dir: Path  # the engine may keep its own files here
    stdout_path: Path
    stderr_path: Path


class EngineEvents(Protocol):
    """How an engine tells the server what happened. Safe to call from the event loop only."""

    def running(self, task_id: str, attempt: int, handle: Handle) -> None: ...

    def exited(self, task_id: str, attempt: int, exit: Exit) -> None: ...


class EngineError(Exception):
    """The engine cannot do what was asked (cluster unreachable, bad pool option, ...)."""


class NotStartedError(Exception):
    """Raised by adopt(): the attempt never started (the server died between recording the
    start and the engine starting it), so it can safely be queued again."""


class Engine(Protocol):
    name: str
    places_work: bool

    async def check(self, pool: Pool) -> None:
        """Raise EngineError with a one-line reason if the pool cannot take work now."""

    def capacity(self) -> Resources:
        """Total resources (only used when places_work is False)."""

    async def start(self, launch: Launch) -> Handle:
        """Start (or submit) one attempt and return what is needed to find it again.

        Must eventually call events.running(...) once it runs and events.exited(...) once
        it ends, also if starting failed later on.
        """

    async def signal(self, handle: Handle, signum: int) -> None:
        """Send a signal to the attempt's process group (Ctrl-C of vrun)."""

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        """Stop the attempt: SIGTERM, then SIGKILL after grace_s. exited() still follows."""

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        """After a server restart: find a running attempt again and watch it to its end."""

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        """The attempt's command waits for a task of its subtree, in a `vrun` say (on), or
        stopped waiting (off): let other work use its CPUs meanwhile. The local engine does
        nothing here, since velda's scheduler counts a blocked task's CPUs as free itself."""

    async def close(self) -> None:
        """The server is stopping. Running work keeps running."""
