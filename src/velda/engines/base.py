"""The engine interface: what places and starts a task's process.

An engine knows nothing of the store, the scheduler or HTTP. The server hands it a `Launch`
(everything needed to run one attempt), keeps the JSON `handle` it returns in the store, and
hears back through `EngineEvents`. Logs are files: the engine makes the attempt's stdout and
stderr land, byte for byte, in `launch.stdout_path` and `launch.stderr_path`.

Engines that place work themselves (Ray, Slurm) set `places_work = True`: the server hands them
a task as soon as its dependencies are met and they report `running` when it really starts.
The local engine sets it to False: velda's scheduler counts its CPUs and GPUs. That flag picks
how the server dispatches a pool's tasks (server/dispatch.py) and is read nowhere else.

An engine is one module that registers itself by one line in `engines/__init__.py`. Every
engine passes one contract suite (tests/test_engine_contract.py): output byte for byte, exact
exit codes and signals, environment and working directory, cancel with its grace period,
signals, adoption after a restart. It drives the engine through this protocol with an
EngineEvents that checks the order of its reports; a new engine adds itself to that suite.
"""

from __future__ import annotations

from collections.abc import Callable
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
    timeout_s: float | None = None  # velda's own clock runs too; an engine may also pass it on
    parent_id: str | None = None
    shard_id: int | None = None  # shards of one parent share argv, cwd and pool
    server_home: Path | None = None  # the server's VELDA_HOME, for engines on its machine
    # (rows, columns): run the attempt under a pseudo-terminal of that size on its node, as
    # stdin, stdout and stderr, its output kept in stdout_path; None: stdin empty, no terminal
    terminal: tuple[int, int] | None = None


StartResult = Handle | Exception  # what start_many gives for each launch, in order


class EngineEvents(Protocol):
    """How an engine tells the server what happened. Safe to call from the event loop only."""

    def running(self, task_id: str, attempt: int, handle: Handle,
                started_at: float | None = None) -> None:
        """The attempt's command runs. `started_at`: when it started (epoch seconds, by the
        clock of the machine it runs on), from an engine that learns of a start some time
        after it; else the server takes the time of the report."""

    def exited(self, task_id: str, attempt: int, exit: Exit,
               written: Callable[[], None] | None = None) -> None:
        """The attempt ended. `written`: called once the exit is in the store (committed),
        or will never be: the engine may then let go of what kept it until then (the local
        engine reaps the process it spawned itself, whose zombie is its record till then)."""


class EngineError(Exception):
    """The engine cannot do what was asked (cluster unreachable, bad pool option, ...).
    `field` names the part of a submit that is at fault, for the 400 the client gets."""

    def __init__(self, message: str, field: str = "pool") -> None:
        super().__init__(message)
        self.field = field


class NotStartedError(Exception):
    """Raised by adopt(): the attempt never started (the server died between recording the
    start and the engine starting it), so it can safely be queued again."""


class Engine(Protocol):
    name: str
    places_work: bool
    # True when the engine writes the attempt's chunk index (logindex.py) itself; otherwise
    # the server indexes the log files while the attempt runs (they must be readable there)
    writes_log_index: bool
    # True when an attempt is a session of processes on the server's machine led by the
    # handle's "pid": the server samples what it uses from /proc (server/usage.py)
    samples_here: bool
    # True when the engine can run an attempt under a terminal (Launch.terminal, terminal())
    gives_terminals: bool

    async def check(self, pool: Pool) -> None:
        """Raise EngineError with a one-line reason if the pool cannot take work now."""

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        """Raise EngineError (with `field`) if a task like this could never run here."""

    def capacity(self) -> Resources:
        """Total resources (only used when places_work is False)."""

    async def inventory(self, pool: Pool) -> dict[str, Any] | None:
        """What the pool's engine has, for `velda pool list` (Slurm: the partition's nodes
        with their CPUs and GPUs, idle and allocated); None when it has nothing to add.
        Raises EngineError when it cannot tell."""

    async def start(self, launch: Launch) -> Handle:
        """Start (or submit) one attempt and return what is needed to find it again.

        Must eventually call events.running(...) once it runs and events.exited(...) once
        it ends, also if starting failed later on.
        """

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        """start() for each launch, in order, with what each gave or raised; an engine may
        submit them together (Slurm makes the shards of one parent one job array)."""

    async def signal(self, handle: Handle, signum: int) -> None:
        """Send a signal to the attempt's process group (Ctrl-C of vrun)."""

    def host_of(self, handle: Handle) -> str:
        """The address where the running attempt's ports can be reached from the server
        (forwarded ports, server/ports.py); EngineError with a one-line reason if none."""

    async def terminal(self, handle: Handle, data: bytes, size: tuple[int, int] | None) -> None:
        """Type `data` into the terminal of an attempt started with one, in order with what
        came before, then resize it to size (rows, columns) if given."""

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


class _StartsOne(Protocol):
    async def start(self, launch: Launch) -> Handle: ...


async def start_each(engine: _StartsOne, launches: list[Launch]) -> list[StartResult]:
    """start_many for engines that start one attempt at a time."""
    results: list[StartResult] = []
    for launch in launches:
        try:
            results.append(await engine.start(launch))
        except Exception as e:  # it ends this attempt and no other
            results.append(e)
    return results
