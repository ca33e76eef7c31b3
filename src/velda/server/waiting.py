"""Why a PENDING or QUEUED task has not started: the `waiting_for` of its JSON.

Computed on demand from the runtime's memory (what is allocated, blocked, reserved) and a few
store reads, only for tasks that wait, so a page of a list costs nothing for the others. Each
answer has a `reason`, the facts behind it, and a one-line `message`; one that cannot resolve
by itself (more GPUs than the machine has, or what it needs held by tasks that wait for it)
also has `"never": true`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from velda.models import Dependency, Pool, Resources, Task, TaskStatus
from velda.outcome import Verdict, dependency_verdict

if TYPE_CHECKING:
    from velda.server.runtime import Runtime

S = TaskStatus
Explanation = dict[str, Any]
MAX_IDS = 20  # IDs listed in held_by and the like; the message says how many more


def explainer(runtime: Runtime) -> Callable[[Task, list[Dependency]], Explanation | None]:
    machine = _MachineCache(runtime)
    # only a QUEUED task's answer looks at the machine
    return lambda task, deps: waiting_for(
        runtime, task, deps, machine() if task.status == S.QUEUED else None
    )


def waiting_for(
    runtime: Runtime, task: Task, deps: list[Dependency], machine: Machine | None = None
) -> Explanation | None:
    if task.status == S.PENDING:
        return _pending(runtime, task, deps)
    if task.status == S.QUEUED:
        return _queued(runtime, task, machine or Machine(runtime))
    return None


class Machine:
    """What this machine has free and who holds the rest, read once for a page of tasks."""

    def __init__(self, runtime: Runtime) -> None:
        self.total = runtime.machine.engine.capacity()
        self.capacity = runtime.free_capacity()
        self.free = Resources(self.capacity.free.cpus, len(self.capacity.free_gpus))
        allocs = runtime.machine.allocs
        self.gpu_holders = sorted(t for t, a in allocs.items() if a.gpu_ids)
        # a blocked task's CPUs are free already: it holds none
        self.cpu_holders = sorted(t for t in allocs if t not in runtime.blocked)


class _MachineCache:
    """One Machine per state of the runtime: any change of it bumps the notifier, or changes
    what is allocated or blocked."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.key: tuple[int, ...] = ()
        self.machine: Machine | None = None

    def __call__(self) -> Machine:
        rt = self.runtime
        dispatch = rt.machine
        key = (rt.notifier.version, len(dispatch.allocs), len(rt.blocked), len(dispatch.reserving))
        if self.machine is None or key != self.key:
            self.key, self.machine = key, Machine(rt)
        return self.machine


# --- PENDING: its parent or its dependencies


def _pending(runtime: Runtime, task: Task, deps: list[Dependency]) -> Explanation:
    parent = task.parent_id
    asked = [d.upstream_id for d in deps] + ([] if parent is None else [parent])
    statuses = runtime.store.statuses(asked)
    if parent is not None and statuses.get(parent) == S.PENDING:
        return _said(
            {"reason": "parent", "task": str(parent)},
            f"its parent {parent} waits for its own dependencies",
        )
    waiting = [
        d.upstream_id for d in deps
        if dependency_verdict(d.kind, statuses.get(d.upstream_id, S.CANCELLED)) == Verdict.WAIT
    ]
    found = {"reason": "dependencies", "tasks": [str(t) for t in waiting]}
    if not waiting:
        return _said(found, "its dependencies are met; it is about to queue")
    ancestors = set(_ancestors(runtime, task))
    own = [t for t in waiting if t in ancestors]
    if own:
        return _never(
            found, f"it waits for task {own[0]}, its own ancestor, which cannot end before it"
        )
    return _said(found, f"waits for {_tasks(waiting)} to end")


# --- QUEUED: an engine, a pool's slots, a gang, or the machine's CPUs and GPUs


def _queued(runtime: Runtime, task: Task, machine: Machine) -> Explanation:
    pool = runtime.config.pool(task.pool)
    if pool is not None and runtime.dispatch_of(pool.name) is runtime.handover:
        return _engine(task, pool)
    need = runtime.machine.need_of(pool) if pool else Resources(cpus=1)
    if need.gpus > machine.total.gpus:
        found = {"reason": "capacity", "needs": _amount(need, True), "free": "-"}
        gpus = machine.total.gpus
        return _never(found, f"it needs {need.gpus} GPUs and this machine has {gpus}")
    if pool is not None and machine.capacity.pool_slots.get(pool.name, 1) <= 0:
        return _pool_full(runtime, task, pool)
    shards = _gang_of(runtime, task)
    if len(shards) > 1:
        need = Resources(need.cpus * len(shards), need.gpus * len(shards))
    if need.fits_in(machine.free):
        return _reserved(runtime, task, need, machine.free, len(shards))
    return _short(runtime, task, need, machine, len(shards))


def _engine(task: Task, pool: Pool) -> Explanation:
    found = {"reason": "engine", "engine": pool.engine, "pool": pool.name}
    if task.submitted_at is None:
        return _said(found, f"about to be handed to the {pool.engine} engine of pool {pool.name}")
    return _said(
        found, f"handed to the {pool.engine} engine of pool {pool.name}, which has not started it"
    )


def _pool_full(runtime: Runtime, task: Task, pool: Pool) -> Explanation:
    holders = sorted(t for t, p in runtime.machine.alloc_pools.items() if p == pool.name)
    limit = pool.capacity or 0
    found = {"reason": "pool_capacity", "pool": pool.name, "limit": limit, **_held(holders)}
    slots = "1 task" if limit == 1 else f"{limit} tasks"
    where = f"pool {pool.name} runs at most {slots} at once"
    if holders and _all_wait_for(runtime, task, holders):
        return _never(found, f"{where}, and {_tasks(holders)} holding them wait for it")
    if not holders:
        return _said(found, f"{where}; the slots are held back for tasks ahead of it")
    return _said(found, f"{where}: held by {_tasks(holders)}")


def _gang_of(runtime: Runtime, task: Task) -> list[Task]:
    if not task.gang or task.parent_id is None:
        return [task]
    shards = runtime.store.children(task.parent_id)
    return [s for s in shards if s.status == S.QUEUED and s.gang] or [task]


def _short(
    runtime: Runtime, task: Task, need: Resources, machine: Machine, shards: int
) -> Explanation:
    """It does not fit in what is free: name who holds what it needs."""
    free = machine.free
    gpus_short = need.gpus > free.gpus
    holders = machine.gpu_holders if gpus_short else machine.cpu_holders
    found = _sized(need, free, shards, holders)
    if gpus_short and holders and _gpus_never_free(runtime, task, need, free, holders):
        return _never(found, f"the GPUs it needs are held by {_tasks(holders)}, waiting for it")
    message = f"{_needs(shards)} {found['needs']}; {found['free']} free"
    return _said(found, message + (f", held by {_tasks(holders)}" if holders else ""))


def _gpus_never_free(
    runtime: Runtime, task: Task, need: Resources, free: Resources, holders: list[int]
) -> bool:
    waiting_for_it = _blocked_ancestors(runtime, task)
    could_free = sum(
        len(runtime.machine.allocs[t].gpu_ids) for t in holders if t not in waiting_for_it
    )
    return free.gpus + could_free < need.gpus


def _reserved(
    runtime: Runtime, task: Task, need: Resources, free: Resources, shards: int
) -> Explanation:
    """It fits in what is free: either a task ahead holds that back, or it starts now."""
    ahead = [t for t in runtime.machine.reserving if t != task.id]
    found = _sized(need, free, shards, [])
    if not ahead:
        return _said(found, f"{_needs(shards)} {found['needs']}, which is free; starting")
    found["reserved_for"] = [str(t) for t in ahead[:MAX_IDS]]
    return _said(
        found,
        f"{_needs(shards)} {found['needs']}; {found['free']} free, held back for "
        f"{_tasks(ahead)} ahead of it in the queue",
    )


def _sized(need: Resources, free: Resources, shards: int, holders: list[int]) -> Explanation:
    gpus = need.gpus > 0
    found: Explanation = {"reason": "gang" if shards > 1 else "capacity"}
    if shards > 1:
        found["shards"] = shards
    found.update(needs=_amount(need, gpus), free=_amount(free, gpus), **_held(holders))
    return found


# --- who waits for whom


def _ancestors(runtime: Runtime, task: Task) -> list[int]:
    chain: list[int] = []
    parent_id = task.parent_id
    while parent_id is not None and len(chain) < 1000:
        chain.append(parent_id)
        parent = runtime.store.get(parent_id)
        parent_id = parent.parent_id if parent else None
    return chain


def _blocked_ancestors(runtime: Runtime, task: Task) -> set[int]:
    """Ancestors blocked in a follow of their subtree: they wait, whatever they follow, until
    this task's branch ends, so what they hold is not given back before it starts."""
    return {t for t in _ancestors(runtime, task) if t in runtime.blocked}


def _all_wait_for(runtime: Runtime, task: Task, holders: list[int]) -> bool:
    return set(holders) <= _blocked_ancestors(runtime, task)


# --- words


def _said(found: Explanation, message: str) -> Explanation:
    found["message"] = message
    return found


def _never(found: Explanation, why: str) -> Explanation:
    found["never"] = True
    found["message"] = f"can never start: {why}"
    return found


def _held(holders: list[int]) -> Explanation:
    return {"held_by": [str(t) for t in holders[:MAX_IDS]]} if holders else {}


def _needs(shards: int) -> str:
    return f"its gang of {shards} shards, started together, needs" if shards > 1 else "needs"


def _amount(r: Resources, gpus: bool) -> str:
    cpus = max(r.cpus, 0.0)
    text = f"{cpus:g} CPU" + ("" if cpus == 1 else "s")
    if gpus:
        text += f", {r.gpus} GPU" + ("" if r.gpus == 1 else "s")
    return text


def _tasks(ids: list[int]) -> str:
    shown = ", ".join(str(t) for t in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return ("task " if len(ids) == 1 else "tasks ") + shown + more
