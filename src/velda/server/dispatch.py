"""How a ready task reaches its engine: two kinds of dispatch, picked by the engine.

- `LocalDispatch`, for an engine whose capacity velda counts (`places_work = False`, the
  local engine): a ready queue in serving order, the allocations of running tasks, the
  machine's free CPUs and GPUs (a blocked task's CPUs count as free), pool slots. Each
  scheduling pass takes the tasks the scheduler finds room for.
- `HandOver`, for an engine that places work itself (Ray, Slurm): a task is handed over as
  soon as it is ready, and waits in the engine's own queue.

Both take what can start now, and on a start that could not be committed give it back.
"""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from velda.config import Config
from velda.engines.base import Engine
from velda.models import Allocation, Pool, Resources, Task
from velda.ready_queue import ReadyQueue
from velda.scheduler import Capacity, Request, schedule
from velda.server.blocked import Blocked

Taken = list[tuple[int, Allocation | None]]  # task IDs to start now, with what each holds


class LocalDispatch:
    def __init__(self, engine: Engine, blocked: Blocked, config: Callable[[], Config]) -> None:
        self.engine = engine
        self.blocked = blocked
        self.config = config
        self.queued = ReadyQueue()  # tasks waiting for capacity
        self.allocs: dict[int, Allocation] = {}  # running tasks holding capacity
        self.alloc_pools: dict[int, str] = {}  # ... and the pool each belongs to
        # what they hold in all, kept as they come and go: a scheduling pass reads these
        # instead of summing over every running task (10,000 of them cost it milliseconds)
        self._cpus_held = 0.0
        self._gpus_held: Counter[int] = Counter()
        self._pool_running: Counter[str] = Counter()
        self.reserving: list[int] = []  # queued tasks the last pass held capacity for

    def add(self, task: Task, pool: Pool | None) -> None:
        need = self.need_of(pool) if pool else Resources(cpus=1)
        gang = task.parent_id if task.gang else None
        self.queued.add(Request(task.id, task.pool, need, task.priority, gang))

    def discard(self, task_id: int) -> None:
        self.queued.discard(task_id)

    def forget_after(self, last_id: int) -> None:
        """A transaction that inserted tasks was rolled back: forget those past `last_id`."""
        for request in self.queued.requests():
            if request.task_id > last_id:
                self.queued.discard(request.task_id)

    def take(self) -> Taken:
        self.reserving = []
        if not self.queued:
            return []
        with self.queued.scan() as queue:
            placements = schedule(queue, self.free_capacity(), self.reserving, queue.skip)
        return [(p.task_id, p.allocation) for p in placements]

    def started(self, taken: Taken) -> None:
        for task_id, _ in taken:
            self.queued.discard(task_id)

    def give_back(self, taken: Taken) -> None:
        """The start was not written: the tasks stay queued, holding nothing."""
        for task_id, _ in taken:
            self.release(task_id)

    def hold(self, task_id: int, alloc: Allocation, pool: str) -> None:
        self.release(task_id)
        self.allocs[task_id] = alloc
        self.alloc_pools[task_id] = pool
        self._cpus_held += alloc.cpus
        self._gpus_held.update(alloc.gpu_ids)
        self._pool_running[pool] += 1

    def release(self, task_id: int) -> bool:
        """Whether the task held capacity (others may start now)."""
        pool = self.alloc_pools.pop(task_id, None)
        if pool is not None:
            self._pool_running[pool] -= 1
        alloc = self.allocs.pop(task_id, None)
        if alloc is None:
            return False
        self._cpus_held = self._cpus_held - alloc.cpus if self.allocs else 0.0
        self._gpus_held.subtract(alloc.gpu_ids)
        self._gpus_held = +self._gpus_held  # devices no one holds any more drop out
        return True

    def free_capacity(self) -> Capacity:
        """What is free: a blocked task's CPUs count as free (below zero once it takes them
        back while others use them); GPUs stay with whoever holds them."""
        total = self.engine.capacity()
        lent = sum(self.allocs[t].cpus for t in self.blocked.tasks() if t in self.allocs)
        used_cpus = self._cpus_held - lent
        used_gpus = set(self._gpus_held)
        return Capacity(
            free=Resources(total.cpus - used_cpus, total.gpus - len(used_gpus)),
            free_gpus=[g for g in range(total.gpus) if g not in used_gpus],
            pool_slots=self._pool_slots(),
        )

    def _pool_slots(self) -> dict[str, int]:
        slots = {}
        for pool in self.config().pools.values():
            if pool.capacity is not None:
                slots[pool.name] = pool.capacity - self._pool_running[pool.name]
        return slots

    def need_of(self, pool: Pool) -> Resources:
        """What a task of the pool holds; a cpu-N larger than the machine gets all of it."""
        return pool.resources.clamp(self.engine.capacity())

    def tasks_at_once(self, pool: Pool) -> int | None:
        """How many tasks of the pool the machine (and the pool's own `capacity`) can run at
        the same time; None when nothing limits it."""
        need, machine = self.need_of(pool), self.engine.capacity()
        limits = [
            int(machine.cpus // need.cpus) if need.cpus else None,
            machine.gpus // need.gpus if need.gpus else None,
            pool.capacity,
        ]
        return min((n for n in limits if n is not None), default=None)

    def gang_misfit(self, pool: Pool, shards: int) -> str | None:
        """Why a gang of `shards` can never run at once here, if it cannot."""
        fits = self.tasks_at_once(pool)
        if fits is None or shards <= fits:
            return None
        return (f"gang of {shards} can never run at once in pool {pool.name}: it fits at most "
                f"{fits} ({self.engine.capacity().describe()} on this machine)")

    def notice_for(self, pool: Pool) -> str | None:
        machine = self.engine.capacity()
        if pool.resources.cpus <= machine.cpus:
            return None
        return (
            f"pool {pool.name} asks for {pool.resources.cpus:g} CPUs and this machine has "
            f"{machine.cpus:g}: each of its tasks runs alone on all of them"
        )

    def fix_for(self, pool: Pool, config_file: Path) -> str | None:
        """How to make a pool that asks for GPUs this machine lacks run on its CPUs: one
        line a shell can run as it is."""
        if not pool.resources.gpus:
            return None
        lines = f'\\n[pools.{pool.name}]\\nengine = "local"\\ncpus = 1\\n'
        return (f"to run its tasks on CPUs instead: printf '{lines}' >> "
                f"{shlex.quote(str(config_file))} (the server reads it within a second)")

    def machine_usage(self) -> dict[str, float]:
        """The machine's CPUs and GPUs: in all, held by running tasks, free."""
        total, free = self.engine.capacity(), self.free_capacity().free
        return {
            "cpus": total.cpus, "cpus_used": total.cpus - max(free.cpus, 0.0),
            "cpus_free": max(free.cpus, 0.0),
            "gpus": total.gpus, "gpus_used": total.gpus - free.gpus, "gpus_free": free.gpus,
        }


class HandOver:
    """Ready tasks for engines that place work themselves, handed over at the next pass."""

    def __init__(self) -> None:
        self.waiting: list[int] = []

    def add(self, task: Task, pool: Pool | None) -> None:
        self.waiting.append(task.id)

    def discard(self, task_id: int) -> None:
        return None  # a pass hands over only tasks still QUEUED and not yet handed over

    def forget_after(self, last_id: int) -> None:
        self.waiting = [t for t in self.waiting if t <= last_id]

    def take(self) -> Taken:
        taken, self.waiting = self.waiting, []
        return [(task_id, None) for task_id in taken]

    def started(self, taken: Taken) -> None:
        return None

    def give_back(self, taken: Taken) -> None:
        self.waiting = [task_id for task_id, _ in taken] + self.waiting

    def release(self, task_id: int) -> bool:
        return False  # the engine's cluster keeps its own count

    def tasks_at_once(self, pool: Pool) -> int | None:
        return None

    def gang_misfit(self, pool: Pool, shards: int) -> str | None:
        return None

    def notice_for(self, pool: Pool) -> str | None:
        return None

    def fix_for(self, pool: Pool, config_file: Path) -> str | None:
        return None  # the engine's own error says what its cluster lacks
