"""The nouns of velda: task states, dependency kinds, resources, pools.

Plain enums and dataclasses, shared by the server, the scheduler and the engines.
Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "PENDING"  # waiting for dependencies
    QUEUED = "QUEUED"  # waiting for capacity (or for the engine to start it)
    RUNNING = "RUNNING"  # own command running
    RUNNING_SUBTASKS = "RUNNING_SUBTASKS"  # own command ended, children not all final
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    FAILED_UPSTREAM = "FAILED_UPSTREAM"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"

    def is_final(self) -> bool:
        return self in FINAL_STATES

    def is_active(self) -> bool:
        """Started and not yet final."""
        return self in (TaskStatus.RUNNING, TaskStatus.RUNNING_SUBTASKS)


FINAL_STATES = frozenset(
    {
        TaskStatus.SUCCESS,
        TaskStatus.FAILURE,
        TaskStatus.FAILED_UPSTREAM,
        TaskStatus.SKIPPED,
        TaskStatus.CANCELLED,
    }
)
NEVER_RAN_STATES = frozenset({TaskStatus.FAILED_UPSTREAM, TaskStatus.SKIPPED})


class DependencyKind(StrEnum):
    SUCCESS = "success"  # --after-success
    FAIL = "fail"  # --after-fail
    ANY = "any"  # --after


class Reason(StrEnum):
    """Why an attempt of a task's own command failed."""

    EXIT = "exit"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    LOST = "lost"
    ENGINE_ERROR = "engine-error"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.0
    gpus: int = 0
    memory_mb: int = 0
    custom: tuple[tuple[str, float], ...] = ()

    def fits_in(self, other: Resources) -> bool:
        return self.cpus <= other.cpus + 1e-9 and self.gpus <= other.gpus

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def clamp(self, limit: Resources) -> Resources:
        return Resources(min(self.cpus, limit.cpus), min(self.gpus, limit.gpus))

    def describe(self) -> str:
        parts = [f"{self.cpus:g} CPU" + ("" if self.cpus == 1 else "s")]
        parts.append(f"{self.gpus} GPU" + ("" if self.gpus == 1 else "s"))
        if self.memory_mb:
            parts.append(f"{self.memory_mb} MB")
        parts += [f"{k}={v:g}" for k, v in self.custom]
        return ", ".join(parts)


@dataclass(frozen=True)
class Pool:
    """A named kind of capacity served by one engine.

    `resources` is what one task of the pool asks for. `options` holds engine-specific
    settings from velda.toml (a Ray address, a Slurm partition, ...).
    """

    name: str
    engine: str
    resources: Resources
    options: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    capacity: int | None = None  # at most this many tasks of the pool at once (None: no limit)


@dataclass(frozen=True)
class Exit:
    """How one attempt of a task's own command ended."""

    exit_code: int | None
    signal: int | None = None
    reason: Reason | None = None  # None: it succeeded
    detail: str | None = None  # one line on why, where the exit code does not say it
    # CPU seconds (user, system) of the command and of all it reaped, where its engine read
    # them as it ended: a measure of the attempt, not part of how it ended (not compared)
    cpu: tuple[float, float] | None = field(default=None, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.reason is None and self.exit_code == 0

    @classmethod
    def from_code(cls, code: int) -> Exit:
        if code == 0:
            return cls(0)
        return cls(code, None, Reason.EXIT)

    @classmethod
    def from_signal(cls, signal: int, reason: Reason = Reason.SIGNAL) -> Exit:
        return cls(None, signal, reason)


@dataclass
class Dependency:
    upstream_id: int
    kind: DependencyKind


@dataclass
class Allocation:
    """What a running task holds on the local engine. While the task waits for a task in its
    subtree (a `vrun` inside it), its CPUs count as free; its GPUs stay held."""

    cpus: float = 0.0
    gpu_ids: tuple[int, ...] = ()


@dataclass
class Task:
    """One task as stored. Times are epoch seconds; `finished_at` is the end of the own command
    of the current attempt, `resolved_at` the moment the task became final."""

    id: int
    pool: str
    command: list[str]
    cwd: str
    env: dict[str, str]
    status: TaskStatus = TaskStatus.PENDING
    name: str | None = None
    parent_id: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    attempt: int = 0
    retries: int = 0
    timeout_s: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: Reason | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    resolved_at: float | None = None
    blocking: bool = False
    shard_id: int | None = None
    total_shards: int | None = None
    gang: bool = False
    handle: dict[str, object] | None = None
    alloc: Allocation | None = None
    cancel_requested: bool = False
    reason_detail: str | None = None  # one line on why the attempt ended as it did, if known
    # when the current attempt was handed to its engine: for engines that place work
    # themselves it is QUEUED (in the cluster's queue) from then until it really starts
    submitted_at: float | None = None
    # why velda itself stopped the current attempt (Reason.TIMEOUT), if it did; a cancel is
    # `cancel_requested`, which also covers the tasks that never started
    stop_cause: Reason | None = None
    # (rows, columns) of the terminal the task runs under (`vrun` at a terminal), or None:
    # no terminal, stdin empty, stdout and stderr apart
    terminal: tuple[int, int] | None = None

    @property
    def has_command(self) -> bool:
        return bool(self.command)

    @property
    def own_succeeded(self) -> bool:
        """The task's own part is done and fine (a shard parent has no own command)."""
        if not self.has_command:
            return True
        return self.finished_at is not None and self.reason is None and self.exit_code == 0


@dataclass
class Children:
    """A parent's children by state. SKIPPED and CANCELLED are kept apart from `failed`
    (FAILURE and FAILED_UPSTREAM): a skipped child still counts as fine for the parent's
    outcome (SPEC §4.3), a cancelled one does not."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0
    running: int = 0
    queued: int = 0

    @property
    def open(self) -> int:
        return self.running + self.queued

    def count(self, status: TaskStatus, n: int = 1) -> None:
        self.total += n
        if status == TaskStatus.SUCCESS:
            self.succeeded += n
        elif status == TaskStatus.SKIPPED:
            self.skipped += n
        elif status == TaskStatus.CANCELLED:
            self.cancelled += n
        elif status.is_final():
            self.failed += n
        elif status.is_active():
            self.running += n
        else:
            self.queued += n
