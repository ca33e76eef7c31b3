"""The task lifecycle: submit, start, end, resolve, cancel, retry, recover.

Every state change goes through here, inside one store transaction per step, and the one
place that writes a final status is `_finalize` (a final status never changes except by
`retry`). Engines report back through `running` and `exited`; the HTTP layer calls `submit`,
`cancel`, `retry` and `send_signal`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from copy import copy
from functools import partial
from pathlib import Path
from typing import Any

from velda.config import Config, env_seconds
from velda.engines import REGISTRY, Engines, Registry
from velda.engines.base import (
    Engine,
    EngineError,
    EngineEvents,
    Handle,
    Launch,
)
from velda.engines.local import LocalEngine
from velda.engines.spare_folders import SpareFolders
from velda.models import (
    NEVER_RAN_STATES,
    Allocation,
    Dependency,
    DependencyKind,
    Exit,
    Pool,
    Reason,
    Task,
    TaskStatus,
)
from velda.outcome import Verdict, combine, dependency_verdict, resolved_status
from velda.protocol import BadRequest, SubmitRequest, in_item
from velda.scheduler import Capacity
from velda.server import launches
from velda.server.blocked import Blocked
from velda.server.bursts import SubmitBursts
from velda.server.config_watch import ConfigWatcher
from velda.server.dispatch import HandOver, LocalDispatch, Taken
from velda.server.eager import start_now
from velda.server.fan_ins import FanIns
from velda.server.folders_ahead import FoldersAhead
from velda.server.group_commit import GroupCommit, Joined
from velda.server.notifier import Notifier
from velda.server.recovery import Recovery
from velda.server.refs import Resolver
from velda.server.retry import reopen
from velda.server.sampler import ChunkSampler
from velda.server.space import Space, is_full
from velda.server.timeouts import Timeouts
from velda.server.usage import SubtreeUsage, UsageSampler, usage_of
from velda.store.base import Store

S = TaskStatus
CANCEL_GRACE_S = 10.0  # VELDA_CANCEL_GRACE_S overrides it
BULK_STEP = 500  # shards queued or cancelled per transaction, between which others get in
REPORT_SLACK_S = 0.5  # for the engine to report a process its SIGKILL ended
log = logging.getLogger("velda.server")
# What one attempt leaves on its task, cleared when the next one starts.
_OF_AN_ATTEMPT = ("handle", "finished_at", "exit_code", "signal", "reason", "reason_detail",
                  "stop_cause")
_OWN_VELDA_VARS = ("VELDA_TASK_ID", "VELDA_TASK_NAME", "VELDA_POOL", "VELDA_ATTEMPT",
                   "VELDA_TOKEN", "VELDA_SHARD_ID", "VELDA_TOTAL_SHARDS")


class Runtime:
    def __init__(
        self,
        home: Path,
        config: Config,
        store: Store,
        token_for: Callable[[int], str],
        now: Callable[[], float] = time.time,
        local: Callable[[EngineEvents], Engine] | None = None,
        registry: Registry = REGISTRY,
    ) -> None:
        """`local` makes the engine of local pools (LocalEngine by default); `registry` gives
        the engines of the other pools, by the name a pool's `engine` key says."""
        self.home = home
        self.config = config
        self.store = store
        self.token_for = token_for
        self.now = now
        self.url = ""
        self.notifier = Notifier()
        self.sampler = ChunkSampler(now)  # the chunk index of running local attempts
        self.usage = UsageSampler(now)  # what running local attempts use
        self.subtree_usage = SubtreeUsage(store, self.attempt_usage)
        self.resolver = Resolver(store)
        self.fan_ins = FanIns(self._step_held)  # dependents of many, read at a pace
        self.spares = SpareFolders()  # folders of ended local attempts, for the next
        self.local: Engine = (
            local(self) if local
            else LocalEngine(self, config.local_cpus, config.local_gpus, self.spares)
        )
        self.engines = Engines(self.local, registry, self)
        self.blocked = Blocked(self._blocked_changed)  # tasks waiting for their subtree
        # how ready tasks reach their engines (dispatch.py): counted here, or handed over
        self.machine = LocalDispatch(self.local, self.blocked, lambda: self.config)
        self.handover = HandOver()
        self.timeouts = Timeouts(now, self._time_out)
        self._pass_call: asyncio.Handle | None = None  # the pass asked for, till it runs
        self._pass_waits = False  # ... and it waits out a burst of submits
        self.bursts = SubmitBursts()  # a pass waits out a burst of submits
        self._jobs: set[asyncio.Task[None]] = set()
        self.cancel_grace_s = env_seconds("VELDA_CANCEL_GRACE_S", CANCEL_GRACE_S)
        self.deadlines: dict[int, asyncio.TimerHandle] = {}  # cancelled tasks' last moment
        self.launching: dict[int, asyncio.Event] = {}  # handed to an engine still taking them
        self.space = Space(home, self.request_schedule)  # writes waiting for a full disk
        # the engines' running and exited reports, one transaction per tick (group_commit.py),
        # with the pass that an exit among them asked for
        self.reports = GroupCommit(self._writing, self.space.keep, self._pass_with_reports)
        self.config_file = home / "velda.toml"  # where a fix to the pools goes (main sets it)
        self.ahead: FoldersAhead | None = None  # folders made ahead of local starts (main)
        self.watcher = ConfigWatcher(self.config_file, config, self.apply_config)

    # --- pools

    def pool(self, name: str | None) -> Pool:
        pool_name = name or self.config.default_pool
        pool = self.config.pool(pool_name)
        if pool is None:
            known = ", ".join(self.config.known_pools())
            raise BadRequest(f"unknown pool '{pool_name}'; pools: {known}", "pool")
        return pool

    def apply_config(self, config: Config) -> None:
        """New pools from a changed velda.toml. Tasks already queued keep what they asked
        for; an engine already made for a remote pool keeps its settings until a restart."""
        self.config = config
        override = getattr(self.local, "override", None)  # [local] cpus/gpus (LocalEngine)
        if override is not None:
            override(config.local_cpus, config.local_gpus)
        self.request_schedule()

    async def check_pool(self, pool: Pool) -> None:
        """EngineError, saying what to do, when the pool's tasks can never run."""
        try:
            await self.engine_of(pool.name).check(pool)
        except EngineError as e:
            fix = self.dispatch_of(pool.name).fix_for(pool, self.config_file)
            if fix is None:
                raise
            raise EngineError(f"{e}; {fix}") from e

    def engine_of(self, pool_name: str) -> Engine:
        return self.engines.of(self.config.pool(pool_name))

    def dispatch_of(self, pool_name: str) -> LocalDispatch | HandOver:
        """The one place that asks how an engine takes work (dispatch.py)."""
        return self.handover if self.engine_of(pool_name).places_work else self.machine

    def _dispatches(self) -> tuple[LocalDispatch, HandOver]:
        return self.machine, self.handover

    def notice_for(self, pool: Pool) -> str | None:
        return self.dispatch_of(pool.name).notice_for(pool)

    # --- submit

    async def submit(self, req: SubmitRequest, scope: int | None, key: str | None = None) -> Task:
        """A new task; with `key` (the client's idempotency key), the task an earlier submit
        with the same key made, if there is one."""
        return (await self.submit_or_find(req, scope, key))[0]

    async def submit_or_find(
        self, req: SubmitRequest, scope: int | None, key: str | None = None
    ) -> tuple[Task, bool]:
        """submit(), and whether this call made the task (False: an earlier one did)."""
        tasks, made = await self._submit_many([req], scope, [key] if key else None, False)
        return tasks[0], made

    async def submit_many(
        self, reqs: list[SubmitRequest], scope: int | None, keys: list[str] | None = None,
        numbered: bool = True,
    ) -> list[Task]:
        """New tasks, all or none, in one transaction and in order: a later one may name an
        earlier one (`after_success`, ...). `keys`, one per request: the tasks an earlier
        call with the same keys made, if there are. A bad request is a BadRequest (naming
        its index when `numbered`) and stores nothing."""
        return (await self._submit_many(reqs, scope, keys, numbered))[0]

    async def _submit_many(
        self, reqs: list[SubmitRequest], scope: int | None, keys: list[str] | None,
        numbered: bool,
    ) -> tuple[list[Task], bool]:
        """submit_many(), and whether this call made the tasks."""
        earlier = self._made_before(keys)
        if earlier is not None:
            return earlier, False
        self.bursts.submitted()
        index = range(len(reqs)) if numbered else [None] * len(reqs)
        pools = [in_item(i, self.pool, req.pool) for i, req in zip(index, reqs, strict=True)]
        for pool in {p.name: p for p in pools}.values():
            try:
                await self.check_pool(pool)
            except EngineError as e:
                raise BadRequest(str(e), "pool") from e
        with self._writing():
            earlier = self._made_before(keys)
            if earlier is not None:  # the same request, again, while this one awaited
                return earlier, False
            tasks = [in_item(i, self._add, req, pool, scope, keys and keys[n])
                     for n, (i, req, pool) in enumerate(zip(index, reqs, pools, strict=True))]
            # once every one was accepted: the ones stored QUEUED go to their queue, the
            # others are stepped (their dependencies may have decided already)
            waiting = [task for task in tasks if task.status == S.PENDING]
            for task in tasks:
                if task.status == S.QUEUED:
                    self.enqueue(task)
            self.cascade([task.id for task in waiting], waiting)
        self.changed()
        if waiting:  # the cascade may have moved on tasks it read itself
            tasks = self._as_stored(tasks)
        for req, task in zip(reqs, tasks, strict=True):
            if req.blocking and scope is not None and not task.status.is_final():
                self.blocked.submitted(task.id, scope)  # its vrun follows it from now on
        return tasks, True

    def _as_stored(self, tasks: list[Task]) -> list[Task]:
        """`tasks` as stored now. Each change the cascade makes to a task changes its status,
        so only those whose stored status is not the one in hand are read again whole."""
        stored = self.store.statuses([task.id for task in tasks])
        moved = [task.id for task in tasks if stored.get(task.id) != task.status]
        again = {task.id: task for task in self.store.get_many(moved)}
        return [again.get(task.id, task) for task in tasks]

    def _made_before(self, keys: list[str] | None) -> list[Task] | None:
        """The tasks of an earlier call with these keys (all of them: one call stores all
        or none), or None."""
        if not keys or self.store.by_idempotency_key(keys[0]) is None:
            return None
        tasks = [self.store.by_idempotency_key(key) for key in keys]
        return [task for task in tasks if task is not None]

    def _add(self, req: SubmitRequest, pool: Pool, scope: int | None, key: str | None) -> Task:
        """One new task, checked and stored, not yet stepped."""
        parent = self._check_submit(req, pool, scope)
        deps = self._dependencies(req, scope)
        # nothing to wait for: stored QUEUED at once, one write fewer than stepping it
        ready = (not deps and req.total_shards is None and bool(req.command)
                 and (parent is None or parent.status != S.PENDING))
        task = self._insert(req, pool, scope, deps, S.QUEUED if ready else S.PENDING)
        if key:
            self.store.set_idempotency_key(task.id, key)
        if req.total_shards is not None:
            self._insert_shards(task, req, pool)
        return task

    def _check_submit(self, req: SubmitRequest, pool: Pool, scope: int | None) -> Task | None:
        """Refuses what cannot be stored; the parent task (in scope), if there is one."""
        try:
            self.engine_of(pool.name).check_task(pool, req.cwd, req.total_shards, req.gang)
        except EngineError as e:
            raise BadRequest(str(e), e.field) from e
        if req.terminal and not self.engine_of(pool.name).gives_terminals:
            raise BadRequest(f"terminal: pool {pool.name} ({pool.engine}) cannot give a task a "
                             "terminal; run it with --tty no", "terminal")
        parent = None
        if scope is not None:
            parent = self.store.get(scope)
            if parent is None or parent.status.is_final() or parent.cancel_requested:
                raise BadRequest(f"parent task {scope} has already ended", "parent")
        if req.gang and req.total_shards:
            misfit = self.dispatch_of(pool.name).gang_misfit(pool, req.total_shards)
            if misfit:
                raise BadRequest(misfit, "total_shards")
        return parent

    def _dependencies(self, req: SubmitRequest, scope: int | None) -> list[Dependency]:
        deps = []
        # the new task's ancestors end only after it does: waiting for one is waiting forever
        ancestors = [] if scope is None else [scope, *self.store.ancestor_ids(scope)]
        for kind, field, refs in (
            (DependencyKind.SUCCESS, "after_success", req.after_success),
            (DependencyKind.FAIL, "after_fail", req.after_fail),
            (DependencyKind.ANY, "after", req.after),
        ):
            for ref in _split_refs(refs):
                # an ancestor by ID is said so before the resolver finds it out of scope
                upstream_id = int(ref) if ref.isdigit() else None
                if upstream_id not in ancestors:
                    upstream_id = self.resolver.resolve_id(ref, scope, field=field)
                if upstream_id in ancestors:
                    raise BadRequest(
                        f"{field}: task {upstream_id} is an ancestor of the new task; it would "
                        "wait for itself", field,
                    )
                deps.append(Dependency(upstream_id, kind))
        return deps

    def _insert(
        self, req: SubmitRequest, pool: Pool, scope: int | None, deps: list[Dependency],
        status: TaskStatus,
    ) -> Task:
        labels = {**req.labels, "pool": pool.name}
        if scope is not None:
            labels["parent"] = str(scope)
        env = dict(req.env)
        for own in _OWN_VELDA_VARS:
            env.pop(own, None)
        task = Task(
            id=0, pool=pool.name, command=req.command, cwd=req.cwd, env=env, name=req.name,
            status=status, parent_id=scope, labels=labels, priority=req.priority,
            retries=req.retries, timeout_s=req.timeout_s, created_at=self.now(),
            blocking=req.blocking,
            total_shards=req.total_shards, gang=req.gang, terminal=req.terminal,
        )
        self.store.insert(task)
        self.store.add_dependencies(task.id, deps)
        return task

    def _insert_shards(self, parent: Task, req: SubmitRequest, pool: Pool) -> None:
        """The shard set, in one bulk insert: the shards share one command, labels and
        environment (a -N 10000 costs one statement, not 10,000)."""
        parent.command = []
        self.store.update(parent, "command")
        template = Task(
            id=0, pool=pool.name, command=req.command, cwd=req.cwd, env=parent.env,
            name="0", parent_id=parent.id,
            labels={**req.labels, "pool": pool.name, "parent": str(parent.id)},
            priority=req.priority, retries=req.retries, timeout_s=req.timeout_s,
            created_at=parent.created_at, shard_id=0, total_shards=req.total_shards,
            gang=req.gang,
        )
        self.store.insert_shards(template, req.total_shards or 0)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One step in one transaction. On a full disk the store rolls it back whole: drop
        from memory what it queued for tasks that are not stored, and start no new work until
        there is space again (the OSError goes on to the caller)."""
        try:
            with self.store.transaction():
                yield
        except OSError as e:
            if is_full(e):
                last = self.store.last_id()  # read after the rollback: the last stored task
                for dispatch in self._dispatches():
                    dispatch.forget_after(last)
                self.space.note_full(e)
            raise
        self.space.wrote()

    # --- state changes, one worklist so long chains never recurse

    def cascade(self, ids: list[int], in_hand: Iterable[Task] = ()) -> None:
        """Re-evaluate tasks until nothing more changes: PENDING tasks whose dependencies
        decided, parents whose last child became final. `in_hand`: tasks of `ids` that this
        step wrote through these very objects, stepped without reading them back."""
        fresh = {task.id: task for task in in_hand}
        work = deque(ids)
        while work:
            task_id = work.popleft()
            task = fresh.pop(task_id, None) or self.store.get(task_id)
            if task is None or task.status.is_final():
                continue
            work.extend(self._step(task))

    def _step_held(self, task_id: int) -> None:
        """A dependent that fan_ins.py held back, stepped with this tick's reports."""
        self.reports.add(("step", task_id), partial(self._step_now, task_id))

    def _step_now(self, task_id: int) -> None:
        self.cascade([task_id])
        self.changed()

    def _step(self, task: Task) -> list[int]:
        if task.status == S.PENDING:
            return self._advance(task)
        if task.status == S.RUNNING_SUBTASKS and not self.store.has_open_children(task.id):
            return self._finalize(task, self._settled_status(task))
        return []

    def _advance(self, task: Task) -> list[int]:
        if task.parent_id is not None and self._status_of(task.parent_id) == S.PENDING:
            return []  # a shard waits for its parent's dependencies
        if self.fan_ins.held(task.id):  # read a moment ago, and slowly: read again soon
            return []
        # the kinds and statuses, each once, in one query: a fan-in of 5,000 upstreams read
        # whole at each of their ends cost 14 ms each time, this 0.4 to 2 ms (fan_ins.py)
        began = time.perf_counter()
        states = self.store.dependency_states(task.id)
        self.fan_ins.read(task.id, time.perf_counter() - began)
        verdict = combine([dependency_verdict(kind, S.CANCELLED if status is None else status)
                           for kind, status in states])
        if verdict == Verdict.WAIT:
            return []
        self.fan_ins.forget(task.id)
        if verdict != Verdict.MET:
            return self._finalize(task, S(verdict.value))
        if not task.has_command:
            task.status, task.started_at = S.RUNNING_SUBTASKS, self.now()
            self.store.update(task, "status", "started_at")
            return self._start_children(task)
        self.enqueue(task)
        return []

    def _start_children(self, task: Task) -> list[int]:
        """A parent starts waiting for its children: shards (no dependencies of their own)
        queue in bulk, other children are stepped one by one."""
        if task.total_shards is None:
            return [c.id for c in self.store.children(task.id)] + [task.id]
        waiting = self.store.pending_children(task.id)
        template = self.store.get(waiting[0]) if waiting else None
        if template is None:
            return [task.id]
        try:
            job = asyncio.get_running_loop().create_task(self._enqueue_shards(template, waiting))
        except RuntimeError:  # no loop (tests of pure steps): all at once
            self._queue_shards(template, waiting)
        else:
            self._jobs.add(job)  # keep a reference until it is done
            job.add_done_callback(self._jobs.discard)
        return [task.id]

    async def _enqueue_shards(self, template: Task, ids: list[int]) -> None:
        """Shards queue a few hundred per transaction, letting other requests in between. One
        cancelled meanwhile stays out; a server stopped halfway queues the rest when it
        recovers them (PENDING shards of a started parent); on a full disk the rest waits
        for space."""
        for start in range(0, len(ids), BULK_STEP):
            if start:
                await asyncio.sleep(0)
            try:
                with self._writing():
                    self._queue_shards(template, ids[start : start + BULK_STEP])
            except OSError as e:
                if not is_full(e):
                    raise
                self._queue_shards_later(template, ids[start:], e)
                return

    def _queue_shards_later(self, template: Task, ids: list[int], e: OSError) -> None:
        self.space.keep(("shards", template.parent_id),
                        lambda: self.later(self._enqueue_shards(template, ids)), e)

    def _queue_shards(self, template: Task, ids: list[int]) -> None:
        for task_id, shard_id in self.store.queue_pending(ids):
            shard = copy(template)
            shard.id, shard.shard_id, shard.name = task_id, shard_id, str(shard_id)
            shard.status = S.QUEUED
            self.enqueue(shard)

    def _status_of(self, task_id: int) -> TaskStatus:
        """A task's status; one that does not exist counts as CANCELLED."""
        return self.store.statuses([task_id]).get(task_id, S.CANCELLED)

    def enqueue(self, task: Task) -> None:
        if task.status != S.QUEUED:
            task.status = S.QUEUED
            self.store.update(task, "status")
        self.dispatch_of(task.pool).add(task, self.config.pool(task.pool))
        self.request_schedule()

    def _settled_status(self, task: Task) -> TaskStatus:
        if task.cancel_requested:
            return S.CANCELLED
        # counted in the store's index: a parent of 10,000 children read whole stalled 0.1 s
        return resolved_status(task.own_succeeded, self.store.children_counts([task.id])[task.id])

    def _finalize(self, task: Task, status: TaskStatus, also: tuple[str, ...] = ()) -> list[int]:
        """The one place a task becomes final; `also`: fields of it changed just before, to
        write in the same statement."""
        assert not task.status.is_final()
        task.status, task.resolved_at = status, self.now()
        self.store.update(task, "status", "resolved_at", *also)
        self._release(task.id)
        follow = [dependent for dependent, _ in self.store.dependents(task.id)]
        if status in NEVER_RAN_STATES or status == S.CANCELLED:
            follow += self._finalize_unstarted_children(task, status)
        self.blocked.ended(task.id)
        if task.parent_id is not None:
            follow.append(task.parent_id)
        return follow

    def _finalize_unstarted_children(self, task: Task, status: TaskStatus) -> list[int]:
        """Its children that never started end as it did; what waits on them is stepped."""
        follow = []
        for child in self.store.get_many(self.store.unstarted_children(task.id)):
            follow += self._finalize(child, status)
        return follow

    def _blocked_changed(self, task_id: int, blocked: bool) -> None:
        """A task started or stopped waiting for its subtree: its local CPUs count as free
        (or used) again from the next scheduling pass on."""
        self._lend_cpus(task_id, blocked)
        self.request_schedule()
        self.changed()

    def _lend_cpus(self, task_id: int, on: bool) -> None:
        """Tell the engine of a remote task that its command waits in a vrun (or stopped
        waiting), so that the cluster lends its CPUs meanwhile, as the scheduler does for
        local tasks."""
        task = self.store.get(task_id)
        if task is None or not task.handle:
            return
        self.later(self.engine_of(task.pool).lend_cpus(task.handle, on))

    def _release(self, task_id: int) -> None:
        """The task starts no more (queued) or ended its attempt: what it held is free."""
        for dispatch in self._dispatches():
            dispatch.discard(task_id)
            if dispatch.release(task_id):
                self.request_schedule()
        self.timeouts.disarm(task_id)
        self.fan_ins.forget(task_id)

    # --- scheduling

    def request_schedule(self) -> None:
        """A pass soon: at the end of this tick, or, in a burst of submits, a moment later
        (bursts.py)."""
        if self._pass_call is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests of pure steps)
        wait = self.bursts.wait()
        self._pass_waits = bool(wait)
        if wait:
            self._pass_call = loop.call_later(wait, self._run_schedule)
        else:
            self._pass_call = loop.call_soon(self._run_schedule)

    def _run_schedule(self) -> None:
        self._pass_call = None
        asyncio.ensure_future(self.schedule_once())

    async def schedule_once(self) -> None:
        """Start what can start: remote tasks go to their engine, local ones where the
        scheduler finds them room. Each start is committed before its process exists, so a
        server killed in between never runs a task twice (see recover). On a full disk
        nothing starts: a start is a write."""
        if self.space.full:
            return
        a_pass = None
        try:
            with self._writing():
                a_pass = self._take_pass()
        except OSError as e:
            if not is_full(e):
                raise
            if a_pass is not None:  # its commit found the disk full
                a_pass.give_back()
            return
        if a_pass is not None:
            await self._launch_all(a_pass)
        else:  # the queue waits: its head's folders can be made meanwhile
            self._folders_ahead()

    def _folders_ahead(self) -> None:
        """Not while there are spare folders: the starts take those."""
        if self.ahead is not None and not self.spares:
            self.ahead.refill(self.machine.queued)

    def _pass_with_reports(self) -> Joined | None:
        """The pass asked for at the end of this tick, written in the transaction of the
        engines' reports that asked for it: an exit and the start it makes room for are one
        commit. Its attempts are handed over at once after that commit (eager.py): the local
        engine spawns them in the same turn of the loop."""
        call = self._pass_call
        if call is None or self._pass_waits or self.space.full:
            return None  # none asked for, or it waits out a burst of submits
        a_pass = self._take_pass()  # should it fail, the pass asked for still comes
        if a_pass is None:
            return None  # it comes as asked: nothing can start yet
        call.cancel()
        self._pass_call = None
        return Joined(committed=lambda: start_now(self._launch_all(a_pass), self.later),
                      rolled_back=partial(self._pass_undone, a_pass))

    def _pass_undone(self, a_pass: Pass) -> None:
        """The reports' transaction did not commit: the pass is made again on its own."""
        a_pass.give_back()
        self.request_schedule()

    def _take_pass(self) -> Pass | None:
        """Take what can start and write its new attempts (in the caller's transaction);
        None if nothing can. Should the writing fail, what was taken is given back."""
        taken = [(dispatch, dispatch.take()) for dispatch in self._dispatches()]
        if not any(t for _, t in taken):
            return None
        a_pass = Pass(taken)
        try:
            for _, each in taken:
                self._new_attempts(each, a_pass.started)
        except BaseException:
            a_pass.give_back()
            raise
        return a_pass

    def _new_attempts(self, taken: Taken, started: list[Task]) -> None:
        allocs = dict(taken)
        for task in self.store.get_many(list(allocs)):
            if task.status == S.QUEUED and task.submitted_at is None:
                self._new_attempt(task, allocs[task.id])
                started.append(task)

    def free_capacity(self) -> Capacity:
        return self.machine.free_capacity()

    def _new_attempt(self, task: Task, alloc: Allocation | None) -> None:
        """Local tasks (with an allocation) run from here on; remote ones stay QUEUED, marked
        as handed to their engine, until it reports them running."""
        left = [f for f in _OF_AN_ATTEMPT if getattr(task, f) is not None]  # by one before
        for name in left:
            setattr(task, name, None)
        task.submitted_at = self.now()
        if alloc is not None:
            self.machine.hold(task.id, alloc, task.pool)
            task.status, task.started_at = S.RUNNING, task.submitted_at
        task.alloc = alloc
        task.attempt += 1
        self.store.update(task, "status", "started_at", "alloc", "attempt", "submitted_at", *left)
        if alloc is not None:
            self.store.record_attempt(task)

    async def _launch_all(self, a_pass: Pass) -> None:
        """Hand the new attempts of a committed pass to their engines, all of one engine at
        once. Until an engine has taken them (a remote one may take a while: a driver
        starting, sbatch), they are in `launching`: a cancel meanwhile waits for their
        handles (_stop)."""
        a_pass.written()
        started = a_pass.started
        launched = asyncio.Event()
        for task in started:
            self.launching[task.id] = launched
        try:
            await self._hand_over(started)
        finally:
            for task in started:
                del self.launching[task.id]
            launched.set()
        self._folders_ahead()
        if started:
            self.changed()

    async def _hand_over(self, started: list[Task]) -> None:
        by_engine: dict[int, tuple[Engine, list[tuple[Task, Launch]]]] = {}
        for task in started:
            try:
                engine, launch = self.engine_of(task.pool), self.launch_of(task)
            except Exception as e:  # whatever it is, it ends this attempt and no other
                self._launch_failed(task, e)
                continue
            by_engine.setdefault(id(engine), (engine, []))[1].append((task, launch))
        for engine, pairs in by_engine.values():
            results = await engine.start_many([launch for _, launch in pairs])
            for (task, _), result in zip(pairs, results, strict=True):
                if isinstance(result, Exception):
                    self._launch_failed(task, result)
                elif engine.places_work:  # the others report running, with it, as they start
                    # the handle is written with the tick's reports: a pass in one transaction
                    self.reports.add(("handle", task.id, task.attempt),
                                     partial(self._keep_handle, task.id, task.attempt, result))

    def _launch_failed(self, task: Task, error: Exception) -> None:
        """The attempt could not start: it ends FAILURE (engine-error), says why in its
        stderr and in reason_detail, and gives back what it held."""
        detail = " ".join(_why_not_started(error).split())
        if not isinstance(error, EngineError):
            log.warning("task %s: %s", task.id, detail, exc_info=error)
        try:
            _append(self.attempt_dir(task.id, task.attempt) / "stderr", f"velda: {detail}\n")
        except OSError:
            pass  # no attempt directory: reason_detail still says it
        exit = Exit(None, None, Reason.ENGINE_ERROR, detail)
        self.exited(str(task.id), task.attempt, exit)

    def _keep_handle(self, task_id: int, attempt: int, handle: Handle) -> None:
        """What an engine needs to cancel or signal an attempt it has not started yet."""
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.status != S.QUEUED:
            return  # already running (running() stored its handle) or already ended
        with self.store.transaction():
            task.handle = handle
            self.store.update(task, "handle")

    def launch_of(self, task: Task) -> Launch:
        directory = self.attempt_dir(task.id, task.attempt)
        pool = self.config.pool(task.pool) or self.pool(None)
        self._make_attempt_dir(directory, pool.engine == "local")
        env = launches.task_env(task, pool, self.store.env_of(task.id),
                                self.config.server_url or self.url, self.token_for(task.id))
        return launches.launch_of(task, pool, env, directory, self.home)

    def _make_attempt_dir(self, directory: Path, local: bool) -> None:
        """A spare folder moved there for a local attempt (spare_folders.py), else made, and
        timed for `ahead` (unless it was there: made ahead, or by an earlier try)."""
        if local and self.spares.take(directory) is not None:
            return
        began = time.perf_counter()
        if launches.make_attempt_dir(directory) and self.ahead is not None:
            self.ahead.made(time.perf_counter() - began)

    def attempt_dir(self, task_id: int, attempt: int) -> Path:
        return launches.attempt_dir(self.home, task_id, attempt)

    def attempt_usage(self, task_id: int, attempt: int,
                      ended_at: float | None) -> dict[str, Any] | None:
        """What an attempt used (server/usage.py), or None where nothing was measured."""
        return usage_of(self.attempt_dir(task_id, attempt), self.usage, ended_at,
                        lambda: self.store.attempt_record(task_id, attempt))

    # --- engine events

    def running(self, task_id: str, attempt: int, handle: Handle,
                started_at: float | None = None) -> None:
        self.reports.add(("running", task_id, attempt),
                         lambda: self._commit_running(int(task_id), attempt, handle, started_at))

    def settle(self) -> None:
        """Write the engines' reports of this tick now: what reads a task's handle or state
        to act on it (cancel, a signal, a request) sees every report that came before."""
        self.reports.flush()

    def _commit_running(self, task_id: int, attempt: int, handle: Handle,
                        started_at: float | None) -> None:
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.status.is_final():
            return
        fresh = task.handle is None  # no report before: no sampler has written its files
        with self._writing():
            task.handle = handle
            fields = ["handle"]
            if task.status == S.QUEUED:  # engines that place work themselves
                task.status, task.started_at = S.RUNNING, self._start_of(task, started_at)
                fields += ["status", "started_at"]
                self.store.record_attempt(task)
            self.store.update(task, *fields)
        self.attempt_runs(task, fresh)
        self.changed()

    def _start_of(self, task: Task, reported: float | None) -> float:
        """When an attempt started, as its engine says, within what the server saw: not
        before it was handed over, not after now (another machine's clock may be off)."""
        now = self.now()
        if reported is None:
            return now
        return min(max(reported, task.submitted_at or task.created_at), now)

    def attempt_runs(self, task: Task, fresh: bool = False) -> None:
        """The attempt really runs from now on: its clock starts, and its logs are indexed
        here unless its engine indexes them itself. `fresh`: no server watched it before,
        so there is no index or usage file of it to continue (one read each the fewer)."""
        if task.timeout_s and task.started_at is not None:
            self.timeouts.arm(task.id, task.attempt, task.started_at, task.timeout_s)
        engine = self.engine_of(task.pool)
        directory = self.attempt_dir(task.id, task.attempt)
        if not engine.writes_log_index:
            self.sampler.watch(directory, fresh)
        leader = (task.handle or {}).get("pid")
        if engine.samples_here and isinstance(leader, int):
            self.usage.watch(directory, leader, task.alloc.gpu_ids if task.alloc else (), fresh)

    def exited(self, task_id: str, attempt: int, exit: Exit,
               written: Callable[[], None] | None = None) -> None:
        """An attempt ended. An exit that finds the disk full is kept in memory and written
        as soon as there is space (its engine keeps it across a restart too: its status
        file, or its zombie until `written`)."""
        self.reports.add(("exit", task_id, attempt),
                         lambda: self._commit_exit(int(task_id), attempt, exit), written)

    def _commit_exit(self, task_id: int, attempt: int, exit: Exit) -> None:
        directory = self.attempt_dir(task_id, attempt)
        self.sampler.unwatch(directory)
        self.usage.unwatch(directory)
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.finished_at is not None:
            return
        if task.status.is_final():
            return
        with self._writing():
            ended = self._record_exit(task, exit)
            if self._should_retry(task):
                self._requeue(task, ended)
            else:
                self._own_command_ended(task, ended)
        self.changed()

    def _own_command_ended(self, task: Task, ended: tuple[str, ...]) -> None:
        """It waits for its open children, or (most often: it has none) becomes final now:
        either way the exit's `ended` fields go in the same one write."""
        task.status = S.RUNNING_SUBTASKS
        if self.store.has_open_children(task.id):
            self.store.update(task, "status", *ended)
        else:
            self.cascade(self._finalize(task, self._settled_status(task), ended))

    def _record_exit(self, task: Task, exit: Exit) -> tuple[str, ...]:
        """The attempt's end, on the task and in its attempts; the task's fields it set,
        for the caller to write with what it changes next."""
        self._release(task.id)
        reason = exit.reason
        if task.cancel_requested:
            reason = Reason.CANCELLED
        elif task.stop_cause is not None and not exit.succeeded:
            reason = task.stop_cause
        task.finished_at = self.now()
        task.exit_code, task.signal, task.reason = exit.exit_code, exit.signal, reason
        task.reason_detail = exit.detail
        self.store.record_attempt(task, exit.cpu)
        return ("finished_at", "exit_code", "signal", "reason", "reason_detail")

    def _should_retry(self, task: Task) -> bool:
        return (
            task.reason is not None
            and task.reason != Reason.CANCELLED
            and task.attempt <= task.retries
        )

    def _requeue(self, task: Task, ended: tuple[str, ...]) -> None:
        """QUEUED again for its next attempt, in one write with the exit's `ended` fields
        (the attempt's own record keeps when it finished)."""
        task.finished_at, task.handle, task.submitted_at = None, None, None
        task.status = S.QUEUED
        self.store.update(task, *dict.fromkeys(
            (*ended, "finished_at", "handle", "submitted_at", "status")))
        self.enqueue(task)

    # --- timeouts (the clocks: timeouts.py)

    async def _time_out(self, task_id: int, attempt: int) -> None:
        self.settle()
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.finished_at is not None:
            return
        with self._writing():
            task.stop_cause = Reason.TIMEOUT
            self.store.update(task, "stop_cause")
        await self._stop(task)

    # --- cancel, signal

    async def cancel(self, root_id: int) -> None:
        """Waiting tasks of the subtree end CANCELLED in bulk; each running one is stopped,
        and ends CANCELLED when its process is gone."""
        to_stop = []
        self.settle()
        ids = self.store.subtree_ids(root_id)
        with self._writing():
            self.store.request_cancel(ids)
        for task_id in ids:
            for dispatch in self._dispatches():
                dispatch.discard(task_id)  # none of them starts from now on
        cancelled: set[int] = set()
        for start in range(0, len(ids), BULK_STEP):  # a big shard set lets other requests in
            with self._writing():
                cancelled |= self._cancel_waiting(ids[start : start + BULK_STEP])
            await asyncio.sleep(0)
        with self._writing():
            rest = [i for i in ids if i not in cancelled]
            for task in reversed(self.store.get_many(rest)):
                if task.status.is_final():
                    continue
                if self._own_command_running(task):
                    to_stop.append(task)
                elif task.status in (S.PENDING, S.QUEUED):
                    self.cascade(self._finalize(task, S.CANCELLED))
                else:
                    self.cascade([task.id])
        for task in to_stop:
            await self._stop(task)
        self.changed()

    async def _stop(self, task: Task) -> None:
        """Ask the engine to stop the attempt; whatever the engine does (no process, no
        handle, an error), the attempt ends within the grace period. An attempt its engine
        is still taking is stopped as soon as it has: without its handle, nothing would stop
        what the engine then starts."""
        launched = self.launching.get(task.id)
        if launched is not None:
            self.later(self._stop_once_taken(task, launched))
            return
        try:
            await self.engine_of(task.pool).cancel(task.handle or {}, self.cancel_grace_s)
        except Exception:
            log.exception("task %s: the engine could not cancel it", task.id)
        self.deadlines[task.id] = asyncio.get_running_loop().call_later(
            self.cancel_grace_s + REPORT_SLACK_S, self._end_if_still_running, task.id,
            task.attempt,
        )

    async def _stop_once_taken(self, task: Task, launched: asyncio.Event) -> None:
        await launched.wait()
        self.settle()  # its handle, or its failure to start
        now = self.store.get(task.id)
        if now is not None and now.attempt == task.attempt and not now.status.is_final():
            await self._stop(now)

    def _end_if_still_running(self, task_id: int, attempt: int) -> None:
        self.deadlines.pop(task_id, None)
        task = self.store.get(task_id)
        if task is None or task.attempt != attempt or task.finished_at is not None:
            return
        if task.status not in (S.RUNNING, S.QUEUED):
            return
        detail = (f"its engine did not report the end within the {self.cancel_grace_s:g} s "
                  "grace period; velda ended it")
        self.exited(str(task_id), attempt, Exit(None, None, Reason.CANCELLED, detail))

    def _cancel_waiting(self, ids: list[int]) -> set[int]:
        """What _finalize does for each task, for every waiting task of `ids` at once."""
        ended = self.store.cancel_waiting(ids, self.now())
        for task_id, _ in ended:
            self._release(task_id)
            self.blocked.ended(task_id)
        done = {task_id for task_id, _ in ended}
        parents = {p for _, p in ended if p is not None and p not in done}
        follow = [t for t in self.store.dependents_of(sorted(done)) if t not in done]
        self.cascade(follow + sorted(parents))
        return done

    def _own_command_running(self, task: Task) -> bool:
        if task.status == S.RUNNING:
            return True
        return task.status == S.QUEUED and task.submitted_at is not None  # in its engine

    async def retry(self, task_id: int, key: str | None = None) -> None:
        """Reopen a task; a repeated `key` (the same request again) reopens nothing."""
        if key and self.store.retry_key(task_id) == key:
            return
        task = self.store.get(task_id)
        if task is None or not task.status.is_final():
            raise BadRequest(f"task {task_id} has not ended; nothing to retry", "id", 409)
        if task.status == S.SUCCESS:
            raise BadRequest(f"task {task_id} succeeded; nothing to retry", "id", 409)
        with self.store.transaction():
            if key:
                self.store.set_retry_key(task_id, key)
            self.cascade(reopen(self.store, task))
        self.changed()

    async def pool_usage(self) -> list[dict[str, object]]:
        """Every configured pool, `shell`, and each built-in cpu-N/gpu-N that tasks in the
        store use, with their counts (one pass over the store)."""
        counts = self.store.pool_counts()
        names = set(self.config.pools) | {self.config.default_pool, "shell"} | set(counts)
        pools = [p for p in map(self.config.pool, sorted(names)) if p is not None]
        return [await self._usage_of(pool, counts.get(pool.name, {})) for pool in pools]

    def machine_usage(self) -> dict[str, float]:
        """This machine's CPUs and GPUs for local pools: in all, held by running tasks, free."""
        return self.machine.machine_usage()

    async def _usage_of(self, pool: Pool, counts: dict[str, int]) -> dict[str, object]:
        error, inventory = None, None
        try:
            await self.check_pool(pool)
            inventory = await self.engine_of(pool.name).inventory(pool)
        except EngineError as e:
            error = str(e)
        capacity = self.dispatch_of(pool.name).tasks_at_once(pool)
        r = pool.resources
        return {
            "name": pool.name, "engine": pool.engine,
            "resources": {"cpus": r.cpus, "gpus": r.gpus, "memory_mb": r.memory_mb,
                          **dict(r.custom)},
            "capacity": capacity,
            "running": counts.get(S.RUNNING.value, 0),
            "queued": counts.get(S.QUEUED.value, 0) + counts.get(S.PENDING.value, 0),
            "configured": pool.name in self.config.pools,
            "error": error,
            **(inventory or {}),
        }

    async def send_signal(self, task_id: int, signum: int) -> None:
        task = self._running(task_id)
        await self.engine_of(task.pool).signal(task.handle or {}, signum)

    async def to_terminal(self, task_id: int, data: bytes, size: tuple[int, int] | None) -> None:
        """Keystrokes for (and the new size of) the terminal a task runs under."""
        task = self._running(task_id)
        if task.terminal is None:
            raise BadRequest(f"task {task_id} runs without a terminal", "id", status=409)
        try:
            await self.engine_of(task.pool).terminal(task.handle or {}, data, size)
        except EngineError as e:
            raise BadRequest(f"task {task_id}: {e}", "id", status=409) from e

    def _running(self, task_id: int) -> Task:
        self.settle()
        task = self.store.get(task_id)
        if task is None or task.status != S.RUNNING or not task.handle:
            raise BadRequest(f"task {task_id} is not running", "id", status=409)
        return task

    # --- recovery after a restart (recovery.py)

    async def recover(self) -> None:
        """Find every unfinished task again: queued ones queue, running ones are adopted
        (their processes kept running while the server was down)."""
        await Recovery(self).run()
        self.settle()  # what it found ended is written before the server answers anyone

    def hold(self, task: Task) -> None:
        """A running local task found again keeps what it was given."""
        if task.alloc is not None:
            self.machine.hold(task.id, task.alloc, task.pool)

    def unhold(self, task_id: int) -> None:
        self.machine.release(task_id)

    def later(self, job: Coroutine[Any, Any, None]) -> None:
        future = asyncio.get_running_loop().create_task(job)
        self._jobs.add(future)  # keep a reference until it is done
        future.add_done_callback(self._jobs.discard)

    async def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        self.sampler.close()
        self.usage.close()
        self.space.close()
        for deadline in self.deadlines.values():
            deadline.cancel()
        self.timeouts.close()
        for engine in self.engines.all():
            await engine.close()

    # --- notifications

    def changed(self) -> None:
        """Wake those that follow: event streams, and followers of the tasks written."""
        self.notifier.bump(self.store.changes.take())


class Pass:
    """One scheduling pass: what each dispatch gave it, and the attempts it started."""

    def __init__(self, taken: list[tuple[LocalDispatch | HandOver, Taken]]) -> None:
        self.taken = taken
        self.started: list[Task] = []

    def written(self) -> None:
        """Its attempts are committed: they leave their dispatch's queue."""
        for dispatch, each in self.taken:
            dispatch.started(each)

    def give_back(self) -> None:
        """They were not written: they wait, queued, holding nothing."""
        for dispatch, each in self.taken:
            dispatch.give_back(each)


def _split_refs(refs: list[str]) -> list[str]:
    return [r.strip() for ref in refs for r in ref.split(",") if r.strip()]


def _why_not_started(error: Exception) -> str:
    if isinstance(error, EngineError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"cannot start: {error.strerror}{where}"
    return f"cannot start: {type(error).__name__}: {error}"


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
