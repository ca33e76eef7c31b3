"""The task lifecycle: submit, start, end, resolve, cancel, retry, recover.

Every state change goes through here, inside one store transaction per step, and the one
place that writes a final status is `_finalize` (a final status never changes except by
`retry`). Engines report back through `running` and `exited`; the HTTP layer calls `submit`,
`cancel`, `retry` and `send_signal`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from velda.config import Config
from velda.engines.base import Engine, EngineError, Handle, Launch, NotStartedError
from velda.engines.local import LocalEngine
from velda.models import (
    NEVER_RAN_STATES,
    Allocation,
    Dependency,
    DependencyKind,
    Exit,
    Pool,
    Reason,
    Resources,
    Task,
    TaskStatus,
)
from velda.outcome import Verdict, combine, dependency_verdict, resolved_status
from velda.protocol import BadRequest, SubmitRequest
from velda.ready_queue import ReadyQueue
from velda.scheduler import Capacity, Request, schedule
from velda.server.notifier import Notifier
from velda.server.refs import Resolver
from velda.server.retry import reopen
from velda.store.sqlite import SqliteStore

S = TaskStatus
CANCEL_GRACE_S = 10.0
_OWN_VELDA_VARS = ("VELDA_TASK_ID", "VELDA_TASK_NAME", "VELDA_POOL", "VELDA_ATTEMPT",
                   "VELDA_TOKEN", "VELDA_SHARD_ID", "VELDA_TOTAL_SHARDS")


class Runtime:
    def __init__(
        self,
        home: Path,
        config: Config,
        store: SqliteStore,
        token_for: Callable[[int], str],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.config = config
        self.store = store
        self.token_for = token_for
        self.now = now
        self.url = ""
        self.notifier = Notifier()
        self.resolver = Resolver(store)
        self.local = LocalEngine(self, config.local_cpus, config.local_gpus)
        self.engines: dict[str, Engine] = {"local": self.local}
        self.queued = ReadyQueue()  # local tasks waiting for capacity
        self.remote_queue: list[int] = []  # tasks to hand to engines that place work
        self.allocs: dict[int, Allocation] = {}  # local tasks holding capacity
        self.alloc_pools: dict[int, str] = {}  # ... and the pool each belongs to
        self.blockers: dict[int, int] = {}  # task -> open children it waits for (vrun)
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self._schedule_pending = False
        self._jobs: set[asyncio.Task[None]] = set()

    # --- pools

    def pool(self, name: str | None) -> Pool:
        pool_name = name or self.config.default_pool
        pool = self.config.pool(pool_name)
        if pool is None:
            known = ", ".join(self.config.known_pools())
            raise BadRequest(f"unknown pool '{pool_name}'; pools: {known}", "pool")
        return pool

    def engine_of(self, pool_name: str) -> Engine:
        """The engine serving a pool; one per remote pool, made on first use. A pool that
        left velda.toml while it had tasks is served by the local engine."""
        pool = self.config.pool(pool_name)
        if pool is None or pool.engine == "local":
            return self.local
        key = f"{pool.engine}:{pool.name}"
        if key not in self.engines:
            from velda.engines import load_engine

            self.engines[key] = load_engine(pool, self)
        return self.engines[key]

    def need_of(self, pool: Pool) -> Resources:
        """What a task of a local pool holds; a cpu-N larger than the machine gets all of it."""
        return pool.resources.clamp(self.local.capacity())

    def notice_for(self, pool: Pool) -> str | None:
        machine = self.local.capacity()
        if pool.engine != "local" or pool.resources.cpus <= machine.cpus:
            return None
        return (
            f"pool {pool.name} asks for {pool.resources.cpus:g} CPUs and this machine has "
            f"{machine.cpus:g}: each of its tasks runs alone on all of them"
        )

    # --- submit

    async def submit(self, req: SubmitRequest, scope: int | None) -> Task:
        pool = self.pool(req.pool)
        try:
            await self.engine_of(pool.name).check(pool)
        except EngineError as e:
            raise BadRequest(str(e), "pool") from e
        self._check_submit(req, pool, scope)
        deps = self._dependencies(req, scope)
        with self.store.transaction():
            task = self._insert(req, pool, scope, deps)
            if req.total_shards is not None:
                self._insert_shards(task, req, pool)
            self._cascade([task.id])
        self._changed()
        return self.store.get(task.id) or task  # the cascade may have moved it on

    def _check_submit(self, req: SubmitRequest, pool: Pool, scope: int | None) -> None:
        if pool.engine == "local" and not os.path.isdir(req.cwd):
            raise BadRequest(f"cwd: working directory {req.cwd} does not exist", "cwd")
        if scope is not None:
            parent = self.store.get(scope)
            if parent is None or parent.status.is_final() or parent.cancel_requested:
                raise BadRequest(f"parent task {scope} has already ended", "parent")
        if req.gang and req.total_shards and pool.engine == "local":
            self._check_gang_fits(pool, req.total_shards)

    def _check_gang_fits(self, pool: Pool, shards: int) -> None:
        fits = self.tasks_at_once(pool)
        if fits is not None and shards > fits:
            raise BadRequest(
                f"gang of {shards} can never run at once in pool {pool.name}: "
                f"it fits at most {fits} ({self.local.capacity().describe()} on this machine)",
                "total_shards",
            )

    def tasks_at_once(self, pool: Pool) -> int | None:
        """How many tasks of a local pool the machine (and the pool's own `capacity`) can run
        at the same time; None when nothing limits it."""
        need, machine = self.need_of(pool), self.local.capacity()
        limits = [
            int(machine.cpus // need.cpus) if need.cpus else None,
            machine.gpus // need.gpus if need.gpus else None,
            pool.capacity,
        ]
        return min((n for n in limits if n is not None), default=None)

    def _dependencies(self, req: SubmitRequest, scope: int | None) -> list[Dependency]:
        deps = []
        for kind, refs in (
            (DependencyKind.SUCCESS, req.after_success),
            (DependencyKind.FAIL, req.after_fail),
            (DependencyKind.ANY, req.after),
        ):
            for ref in _split_refs(refs):
                upstream = self.resolver.resolve(ref, scope, field=f"after_{kind.value}")
                deps.append(Dependency(upstream.id, kind))
        return deps

    def _insert(
        self, req: SubmitRequest, pool: Pool, scope: int | None, deps: list[Dependency]
    ) -> Task:
        labels = {**req.labels, "pool": pool.name}
        if scope is not None:
            labels["parent"] = str(scope)
        env = {k: v for k, v in req.env.items() if k not in _OWN_VELDA_VARS}
        task = Task(
            id=0, pool=pool.name, command=req.command, cwd=req.cwd, env=env, name=req.name,
            parent_id=scope, labels=labels, priority=req.priority, retries=req.retries,
            timeout_s=req.timeout_s, created_at=self.now(), blocking=req.blocking,
            total_shards=req.total_shards, gang=req.gang,
        )
        self.store.insert(task)
        self.store.add_dependencies(task.id, deps)
        if req.blocking and scope is not None:
            self.blockers[scope] = self.blockers.get(scope, 0) + 1
            if self.blockers[scope] == 1:
                self._lend_cpus(scope, True)
        return task

    def _insert_shards(self, parent: Task, req: SubmitRequest, pool: Pool) -> None:
        parent.command = []
        self.store.update(parent, "command")
        for i in range(req.total_shards or 0):
            shard = Task(
                id=0, pool=pool.name, command=req.command, cwd=req.cwd, env=parent.env,
                name=str(i), parent_id=parent.id,
                labels={**req.labels, "pool": pool.name, "parent": str(parent.id)},
                priority=req.priority, retries=req.retries, timeout_s=req.timeout_s,
                created_at=parent.created_at, shard_id=i, total_shards=req.total_shards,
                gang=req.gang,
            )
            self.store.insert(shard)

    # --- state changes, one worklist so long chains never recurse

    def _cascade(self, ids: list[int]) -> None:
        """Re-evaluate tasks until nothing more changes: PENDING tasks whose dependencies
        decided, parents whose last child became final."""
        work = deque(ids)
        while work:
            task = self.store.get(work.popleft())
            if task is None or task.status.is_final():
                continue
            work.extend(self._step(task))

    def _step(self, task: Task) -> list[int]:
        if task.status == S.PENDING:
            return self._advance(task)
        if task.status == S.RUNNING_SUBTASKS and not self.store.open_children_count(task.id):
            return self._finalize(task, self._settled_status(task))
        return []

    def _advance(self, task: Task) -> list[int]:
        if task.parent_id is not None:
            parent = self.store.get(task.parent_id)
            if parent is not None and parent.status == S.PENDING:
                return []  # a shard waits for its parent's dependencies
        verdicts = [
            dependency_verdict(d.kind, self._status_of(d.upstream_id))
            for d in self.store.dependencies(task.id)
        ]
        verdict = combine(verdicts)
        if verdict == Verdict.WAIT:
            return []
        if verdict != Verdict.MET:
            return self._finalize(task, S(verdict.value))
        if not task.has_command:
            task.status, task.started_at = S.RUNNING_SUBTASKS, self.now()
            self.store.update(task, "status", "started_at")
            return [c.id for c in self.store.children(task.id)] + [task.id]
        self._enqueue(task)
        return []

    def _status_of(self, task_id: int) -> TaskStatus:
        upstream = self.store.get(task_id)
        return upstream.status if upstream else S.CANCELLED

    def _enqueue(self, task: Task) -> None:
        if task.status != S.QUEUED:
            task.status = S.QUEUED
            self.store.update(task, "status")
        pool = self.config.pool(task.pool)
        if pool is not None and pool.engine != "local":
            self.remote_queue.append(task.id)
        else:
            need = self.need_of(pool) if pool else Resources(cpus=1)
            gang = task.parent_id if task.gang else None
            self.queued.add(
                Request(task.id, task.pool, need, task.priority, self._ancestors(task), gang)
            )
        self._request_schedule()

    def _ancestors(self, task: Task) -> tuple[int, ...]:
        chain, parent_id = [], task.parent_id
        while parent_id is not None:
            chain.append(parent_id)
            parent = self.store.get(parent_id)
            parent_id = parent.parent_id if parent else None
        return tuple(chain)

    def _settled_status(self, task: Task) -> TaskStatus:
        if task.cancel_requested:
            return S.CANCELLED
        children = [c.status for c in self.store.children(task.id)]
        return resolved_status(task.own_succeeded, children)

    def _finalize(self, task: Task, status: TaskStatus) -> list[int]:
        """The one place a task becomes final."""
        assert not task.status.is_final()
        task.status, task.resolved_at = status, self.now()
        self.store.update(task, "status", "resolved_at")
        self.queued.discard(task.id)
        self._release(task.id)
        follow = [dependent for dependent, _ in self.store.dependents(task.id)]
        if status in NEVER_RAN_STATES or status == S.CANCELLED:
            self._finalize_unstarted_children(task, status)
        if task.parent_id is not None:
            if task.blocking:
                self._unblock(task.parent_id)
            follow.append(task.parent_id)
        return follow

    def _finalize_unstarted_children(self, task: Task, status: TaskStatus) -> None:
        for child in self.store.children(task.id):
            if child.status in (S.PENDING, S.QUEUED) and child.started_at is None:
                self._finalize(child, status)

    def _unblock(self, parent_id: int) -> None:
        left = self.blockers.get(parent_id, 0) - 1
        if left > 0:
            self.blockers[parent_id] = left
        else:
            self.blockers.pop(parent_id, None)
            self._lend_cpus(parent_id, False)
        self._request_schedule()

    def _lend_cpus(self, task_id: int, on: bool) -> None:
        """Tell the engine of a remote task that its command waits in a vrun (or stopped
        waiting), so that the cluster lends its CPUs to the children, as the scheduler does
        for local tasks."""
        task = self.store.get(task_id)
        if task is None or not task.handle:
            return
        engine = self.engine_of(task.pool)
        if engine.places_work:
            job = asyncio.get_running_loop().create_task(engine.lend_cpus(task.handle, on))
            self._jobs.add(job)  # keep a reference until it is done
            job.add_done_callback(self._jobs.discard)

    def _release(self, task_id: int) -> None:
        self.alloc_pools.pop(task_id, None)
        if self.allocs.pop(task_id, None) is not None:
            self._request_schedule()
        timer = self.timers.pop(task_id, None)
        if timer:
            timer.cancel()

    # --- scheduling

    def _request_schedule(self) -> None:
        if self._schedule_pending:
            return
        self._schedule_pending = True
        try:
            asyncio.get_running_loop().call_soon(self._run_schedule)
        except RuntimeError:
            self._schedule_pending = False  # no loop (tests of pure steps)

    def _run_schedule(self) -> None:
        self._schedule_pending = False
        asyncio.ensure_future(self.schedule_once())

    async def schedule_once(self) -> None:
        """Start what can start: remote tasks go to their engine, local ones where the
        scheduler finds them room. Each start is committed before its process exists, so a
        server killed in between never runs a task twice (see recover)."""
        remote, self.remote_queue = self.remote_queue, []
        placements = []
        if self.queued:
            with self.queued.scan() as queue:
                placements = schedule(queue, self._capacity())
        if not remote and not placements:
            return
        started = []
        with self.store.transaction():
            for remote_task in self.store.get_many(remote):
                if remote_task.status == S.QUEUED and remote_task.handle is None:
                    self._new_attempt(remote_task, None)
                    started.append(remote_task)
            for placement in placements:
                self.queued.discard(placement.task_id)
                task = self.store.get(placement.task_id)
                if task is not None and task.status == S.QUEUED:
                    self._new_attempt(task, placement.allocation)
                    started.append(task)
        for task in started:
            await self._launch(task)
        if started:
            self._changed()

    def _capacity(self) -> Capacity:
        total = self.local.capacity()
        used_cpus = sum(a.cpus for a in self.allocs.values() if a.lender is None)
        used_gpus = {g for a in self.allocs.values() for g in a.gpu_ids}
        lendable = {}
        for blocked in self.blockers:
            alloc = self.allocs.get(blocked)
            if alloc is not None:
                borrowed = sum(a.cpus for a in self.allocs.values() if a.lender == blocked)
                lendable[blocked] = alloc.cpus - borrowed
        return Capacity(
            free=Resources(total.cpus - used_cpus, total.gpus - len(used_gpus)),
            free_gpus=[g for g in range(total.gpus) if g not in used_gpus],
            lendable=lendable,
            pool_slots=self._pool_slots(),
        )

    def _pool_slots(self) -> dict[str, int]:
        slots = {}
        for pool in self.config.pools.values():
            if pool.capacity is not None:
                running = sum(1 for p in self.alloc_pools.values() if p == pool.name)
                slots[pool.name] = pool.capacity - running
        return slots

    def _new_attempt(self, task: Task, alloc: Allocation | None) -> None:
        """Local tasks (with an allocation) run from here on; remote ones stay QUEUED, marked
        as handed to their engine, until it reports them running."""
        if alloc is not None:
            self.allocs[task.id] = alloc
            self.alloc_pools[task.id] = task.pool
            task.status, task.started_at, task.handle = S.RUNNING, self.now(), None
        else:
            task.handle = {"submitted": True}
        task.alloc = alloc
        task.finished_at = task.exit_code = task.signal = task.reason = None
        task.attempt += 1
        self.store.update(
            task, "status", "started_at", "alloc", "handle", "attempt", "finished_at",
            "exit_code", "signal", "reason",
        )
        if alloc is not None:
            self.store.record_attempt(task)

    async def _launch(self, task: Task) -> None:
        launch = self.launch_of(task)
        engine = self.engine_of(task.pool)
        try:
            handle = await engine.start(launch)
        except EngineError as e:
            _append(launch.stderr_path, f"velda: {e}\n")
            self.exited(str(task.id), task.attempt, Exit(None, None, Reason.ENGINE_ERROR))
            return
        if engine.places_work:
            self._keep_handle(task.id, task.attempt, handle)
        if task.timeout_s:
            self._arm_timeout(task)

    def _keep_handle(self, task_id: int, attempt: int, handle: Handle) -> None:
        """What a remote engine needs to cancel or signal a task it has not started yet."""
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.status != S.QUEUED:
            return  # already running (running() stored its handle) or already ended
        with self.store.transaction():
            task.handle = {**handle, "submitted": True}
            self.store.update(task, "handle")

    def launch_of(self, task: Task) -> Launch:
        attempt_dir = self.attempt_dir(task.id, task.attempt)
        try:
            attempt_dir.mkdir()
        except FileNotFoundError:
            attempt_dir.parent.mkdir(parents=True, exist_ok=True)
            attempt_dir.mkdir()
        except FileExistsError:
            pass
        pool = self.config.pool(task.pool) or self.pool(None)
        gpu_ids = task.alloc.gpu_ids if task.alloc else ()
        return Launch(
            task_id=str(task.id), attempt=task.attempt, argv=task.command, cwd=task.cwd,
            env=self._task_env(task, pool, gpu_ids), pool=pool, gpu_ids=gpu_ids,
            attempt_dir=attempt_dir, stdout_path=attempt_dir / "stdout",
            stderr_path=attempt_dir / "stderr",
        )

    def attempt_dir(self, task_id: int, attempt: int) -> Path:
        """One directory per attempt, straight under logs/: one mkdir per start."""
        return self.home / "logs" / f"{task_id}.{attempt}"

    def _task_env(self, task: Task, pool: Pool, gpu_ids: tuple[int, ...]) -> dict[str, str]:
        env = self.store.env_of(task.id)
        cpus = task.alloc.cpus if task.alloc else pool.resources.cpus
        env.update(
            VELDA_TASK_ID=str(task.id), VELDA_TASK_NAME=task.name or "", VELDA_POOL=task.pool,
            VELDA_ATTEMPT=str(task.attempt), VELDA_SERVER=self.config.server_url or self.url,
            VELDA_TOKEN=self.token_for(task.id), OMP_NUM_THREADS=str(max(1, int(cpus))),
        )
        if pool.engine == "local":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
        if task.shard_id is not None:
            env["VELDA_SHARD_ID"] = str(task.shard_id)
            env["VELDA_TOTAL_SHARDS"] = str(task.total_shards)
        return env

    # --- engine events

    def running(self, task_id: str, attempt: int, handle: Handle) -> None:
        task = self.store.get(int(task_id))
        if task is None or task.attempt != attempt or task.status.is_final():
            return
        with self.store.transaction():
            task.handle = handle
            fields = ["handle"]
            if task.status == S.QUEUED:  # engines that place work themselves
                task.status, task.started_at = S.RUNNING, self.now()
                fields += ["status", "started_at"]
                self.store.record_attempt(task)
            self.store.update(task, *fields)
        self._changed()

    def exited(self, task_id: str, attempt: int, exit: Exit) -> None:
        task = self.store.get(int(task_id))
        if task is None or task.attempt != attempt or task.finished_at is not None:
            return
        if task.status.is_final():
            return
        with self.store.transaction():
            self._record_exit(task, exit)
            if self._should_retry(task):
                self._requeue(task)
            else:
                task.status = S.RUNNING_SUBTASKS
                self.store.update(task, "status")
                self._cascade([task.id])
        self._changed()

    def _record_exit(self, task: Task, exit: Exit) -> None:
        self._release(task.id)
        reason = exit.reason
        if task.cancel_requested:
            reason = Reason.CANCELLED
        elif task.handle and task.handle.get("timed_out") and not exit.succeeded:
            reason = Reason.TIMEOUT
        task.finished_at = self.now()
        task.exit_code, task.signal, task.reason = exit.exit_code, exit.signal, reason
        self.store.update(task, "finished_at", "exit_code", "signal", "reason")
        self.store.record_attempt(task)

    def _should_retry(self, task: Task) -> bool:
        return (
            task.reason is not None
            and task.reason != Reason.CANCELLED
            and task.attempt <= task.retries
        )

    def _requeue(self, task: Task) -> None:
        task.finished_at, task.handle = None, None
        self.store.update(task, "finished_at", "handle")
        self._enqueue(task)

    # --- timeouts

    def _arm_timeout(self, task: Task) -> None:
        assert task.timeout_s is not None
        started = task.started_at or self.now()
        delay = max(0.0, started + task.timeout_s - self.now())
        loop = asyncio.get_running_loop()
        self.timers[task.id] = loop.call_later(
            delay, lambda: asyncio.ensure_future(self._time_out(task.id, task.attempt))
        )

    async def _time_out(self, task_id: int, attempt: int) -> None:
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.finished_at is not None:
            return
        with self.store.transaction():
            task.handle = {**(task.handle or {}), "timed_out": True}
            self.store.update(task, "handle")
        await self.engine_of(task.pool).cancel(task.handle, CANCEL_GRACE_S)

    # --- cancel, signal

    async def cancel(self, root_id: int) -> None:
        to_stop = []
        with self.store.transaction():
            for task in reversed(self.store.get_many(self.store.subtree_ids(root_id))):
                if task.status.is_final():
                    continue
                task.cancel_requested = True
                self.store.update(task, "cancel_requested")
                if self._own_command_running(task):
                    to_stop.append(task)
                elif task.status in (S.PENDING, S.QUEUED):
                    self._cascade(self._finalize(task, S.CANCELLED))
                else:
                    self._cascade([task.id])
        for task in to_stop:
            await self.engine_of(task.pool).cancel(task.handle or {}, CANCEL_GRACE_S)
        self._changed()

    def _own_command_running(self, task: Task) -> bool:
        if task.status == S.RUNNING:
            return True
        return task.status == S.QUEUED and task.handle is not None  # submitted to an engine

    async def retry(self, task_id: int) -> None:
        task = self.store.get(task_id)
        if task is None or not task.status.is_final():
            raise BadRequest(f"task {task_id} has not ended; nothing to retry", "id", 409)
        if task.status == S.SUCCESS:
            raise BadRequest(f"task {task_id} succeeded; nothing to retry", "id", 409)
        with self.store.transaction():
            self._cascade(reopen(self.store, task))
        self._changed()

    async def pool_usage(self) -> list[dict[str, object]]:
        names = set(self.config.pools) | {self.config.default_pool}
        names |= {r.pool for r in self.queued.requests()} | set(self.alloc_pools.values())
        return [await self._usage_of(self.pool(name)) for name in sorted(names)]

    async def _usage_of(self, pool: Pool) -> dict[str, object]:
        error, capacity = None, None
        try:
            engine = self.engine_of(pool.name)
            await engine.check(pool)
        except EngineError as e:
            error = str(e)
        if pool.engine == "local":
            capacity = self.tasks_at_once(pool)
        r = pool.resources
        return {
            "name": pool.name, "engine": pool.engine,
            "resources": {"cpus": r.cpus, "gpus": r.gpus, "memory_mb": r.memory_mb,
                          **dict(r.custom)},
            "capacity": capacity,
            "running": self.store.count_in_pool(pool.name, (S.RUNNING,)),
            "queued": self.store.count_in_pool(pool.name, (S.QUEUED, S.PENDING)),
            "error": error,
        }

    async def send_signal(self, task_id: int, signum: int) -> None:
        task = self.store.get(task_id)
        if task is None or task.status != S.RUNNING or not task.handle:
            raise BadRequest(f"task {task_id} is not running", "id", status=409)
        await self.engine_of(task.pool).signal(task.handle, signum)

    # --- recovery after a restart

    async def recover(self) -> None:
        """Find every unfinished task again: queued ones queue, running ones are adopted
        (their processes kept running while the server was down)."""
        open_tasks = self.store.open_tasks()
        for task in open_tasks:
            if task.blocking and task.parent_id is not None:
                self.blockers[task.parent_id] = self.blockers.get(task.parent_id, 0) + 1
            if task.status == S.RUNNING and task.alloc is not None:
                self.allocs[task.id] = task.alloc
                self.alloc_pools[task.id] = task.pool
        for task in open_tasks:
            await self._recover_one(task)
        for parent_id in list(self.blockers):
            self._lend_cpus(parent_id, True)  # the last word may not have reached the node
        self._changed()
        self._request_schedule()

    async def _recover_one(self, task: Task) -> None:
        if task.status == S.QUEUED and task.handle is None:
            with self.store.transaction():
                self._enqueue(task)
            return
        if task.status not in (S.RUNNING, S.QUEUED):
            with self.store.transaction():
                self._cascade([task.id])
            return
        try:
            await self.engine_of(task.pool).adopt(
                str(task.id), task.attempt, task.handle or {}, self.launch_of(task)
            )
        except NotStartedError:
            with self.store.transaction():
                self.allocs.pop(task.id, None)
                self.alloc_pools.pop(task.id, None)
                task.attempt -= 1
                task.status = S.QUEUED
                self.store.update(task, "attempt", "status")
                self._enqueue(task)
            return
        if task.timeout_s and task.status == S.RUNNING:
            self._arm_timeout(task)

    async def close(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        for engine in self.engines.values():
            await engine.close()

    # --- notifications

    def _changed(self) -> None:
        self.notifier.bump()


def _split_refs(refs: list[str]) -> list[str]:
    return [r.strip() for ref in refs for r in ref.split(",") if r.strip()]


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
