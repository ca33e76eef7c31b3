"""A store in dicts, for tests: the promises of store.base.Store without SQLite.

A transaction keeps a copy of everything and puts it back if the block raises; the stored
tasks are copies, and so is each task handed out, so nothing changes behind the store's back.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from velda.models import (
    FINAL_STATES,
    Children,
    Dependency,
    DependencyKind,
    Task,
    TaskStatus,
)
from velda.store.base import AttemptRecord, ChangeLog

_WAITING = (TaskStatus.PENDING, TaskStatus.QUEUED)


@dataclass
class _State:
    """Everything stored: what a transaction saves and puts back whole."""

    last_id: int = 0  # the highest ID ever given, as AUTOINCREMENT keeps it
    tasks: dict[int, Task] = field(default_factory=dict)
    labels: dict[int, dict[str, str]] = field(default_factory=dict)  # as inserted
    deps: set[tuple[int, int, DependencyKind]] = field(default_factory=set)
    attempts: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    attempt_cpu: dict[tuple[int, int], tuple[float, float] | None] = field(default_factory=dict)
    idempotency_keys: dict[int, str] = field(default_factory=dict)
    retry_keys: dict[int, str] = field(default_factory=dict)


def _out(task: Task) -> Task:
    """A copy to hand out; like a SQLite read, it leaves the environment behind."""
    return replace(copy.deepcopy(task), env={})


class MemoryStore:
    def __init__(self) -> None:
        self.changes = ChangeLog()
        self._state = _State()
        self._depth = 0

    def close(self) -> None:
        pass

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Nested calls join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        saved = copy.deepcopy(self._state)
        self._depth = 1
        try:
            yield
        except BaseException:
            self._state = saved
            raise
        finally:
            self._depth = 0

    # --- tasks

    def _all(self) -> list[Task]:
        return [self._state.tasks[i] for i in sorted(self._state.tasks)]

    def _children(self, parent_id: int) -> list[Task]:
        return [t for t in self._all() if t.parent_id == parent_id]

    def insert(self, task: Task) -> int:
        self._state.last_id += 1
        task.id = self._state.last_id
        self._state.tasks[task.id] = copy.deepcopy(task)
        self._state.labels[task.id] = dict(task.labels)
        return task.id

    def insert_shards(self, template: Task, count: int) -> None:
        """A shard stores no environment of its own (env_of reads the parent's)."""
        for i in range(count):
            self.insert(replace(template, name=str(i), shard_id=i, env={}))

    def pending_children(self, parent_id: int) -> list[int]:
        return [t.id for t in self._children(parent_id) if t.status == TaskStatus.PENDING]

    def queue_pending(self, ids: list[int]) -> list[tuple[int, int | None]]:
        queued = []
        for t in self._stored(ids):
            if t.status == TaskStatus.PENDING and not t.cancel_requested:
                t.status = TaskStatus.QUEUED
                queued.append((t.id, t.shard_id))
        self.changes.note(task_id for task_id, _ in queued)
        return sorted(queued)

    def unstarted_children(self, parent_id: int) -> list[int]:
        return [
            t.id for t in self._children(parent_id)
            if t.status in _WAITING and t.started_at is None
        ]

    def request_cancel(self, ids: list[int]) -> None:
        self.changes.note(ids)
        for t in self._stored(ids):
            if t.status not in FINAL_STATES:
                t.cancel_requested = True

    def cancel_waiting(self, ids: list[int], now: float) -> list[tuple[int, int | None]]:
        ended = []
        for t in self._stored(ids):
            if t.status in _WAITING and t.submitted_at is None and t.handle is None:
                t.status, t.resolved_at, t.cancel_requested = TaskStatus.CANCELLED, now, True
                ended.append((t.id, t.parent_id))
        self.changes.note(task_id for task_id, _ in ended)
        return ended

    def _stored(self, ids: Iterable[int]) -> list[Task]:
        """The stored tasks (not copies) of `ids`, each once."""
        return [self._state.tasks[i] for i in dict.fromkeys(ids) if i in self._state.tasks]

    def update(self, task: Task, *fields: str) -> None:
        self.changes.note((task.id,))
        stored = self._state.tasks.get(task.id)
        if stored is not None:
            for f in fields:
                setattr(stored, f, copy.deepcopy(getattr(task, f)))

    def get(self, task_id: int) -> Task | None:
        task = self._state.tasks.get(task_id)
        return _out(task) if task else None

    def by_idempotency_key(self, key: str) -> Task | None:
        found = [i for i, k in self._state.idempotency_keys.items() if k == key]
        return self.get(found[0]) if found else None

    def set_idempotency_key(self, task_id: int, key: str) -> None:
        if task_id in self._state.tasks:
            self._state.idempotency_keys[task_id] = key

    def retry_key(self, task_id: int) -> str | None:
        return self._state.retry_keys.get(task_id)

    def set_retry_key(self, task_id: int, key: str) -> None:
        if task_id in self._state.tasks:
            self._state.retry_keys[task_id] = key

    def env_of(self, task_id: int) -> dict[str, str]:
        task = self._state.tasks.get(task_id)
        if task is None:
            return {}
        parent = self._state.tasks.get(task.parent_id) if task.parent_id is not None else None
        if task.shard_id is not None and parent is not None and parent.env:
            return dict(parent.env)
        return dict(task.env)

    def get_many(self, ids: Iterable[int]) -> list[Task]:
        return [_out(self._state.tasks[i]) for i in ids if i in self._state.tasks]

    def statuses(self, ids: list[int]) -> dict[int, TaskStatus]:
        return {t.id: t.status for t in self._stored(ids)}

    def open_tasks(self) -> list[Task]:
        return [_out(t) for t in self._all() if t.status not in FINAL_STATES]

    def newest_named(self, parent_id: int | None, name: str) -> Task | None:
        named = [t for t in self._all() if t.parent_id == parent_id and t.name == name]
        return _out(named[-1]) if named else None

    def children(self, parent_id: int) -> list[Task]:
        return [_out(t) for t in self._children(parent_id)]

    def has_open_children(self, parent_id: int) -> bool:
        return any(t.status not in FINAL_STATES for t in self._children(parent_id))

    def children_counts(self, parent_ids: list[int]) -> dict[int, Children]:
        counts = {p: Children() for p in parent_ids}
        for t in self._all():
            if t.parent_id in counts:
                counts[t.parent_id].count(t.status)
        return counts

    def subtree_ids(self, root_id: int) -> list[int]:
        """Breadth first: a level is sorted, and its children come after it."""
        found, level = [], [root_id]
        while level:
            found += level
            parents = set(level)
            level = sorted(t.id for t in self._all() if t.parent_id in parents)
        return found

    def last_id(self) -> int:
        return max(self._state.tasks, default=0)

    def ancestor_ids(self, task_id: int) -> list[int]:
        found: list[int] = []
        task = self._state.tasks.get(task_id)
        while task is not None and task.parent_id is not None:
            found.append(task.parent_id)
            task = self._state.tasks.get(task.parent_id)
        return found

    def subtree_counts(self, root_id: int) -> Children:
        counts = Children()
        for task in self._stored(self.subtree_ids(root_id)[1:]):
            counts.count(task.status)
        return counts

    def query(
        self,
        *,
        parent_id: int | None,
        top_level: bool,
        statuses: list[str],
        labels: list[tuple[str, str]],
        text: str | None,
        after: int | None,
        limit: int,
    ) -> list[Task]:
        """A page of tasks: children oldest first, anything else newest first.

        `after` is the last ID of the previous page (the page token).
        """
        oldest_first = parent_id is not None
        tasks = self._all() if oldest_first else self._all()[::-1]

        def matches(t: Task) -> bool:
            own = self._state.labels.get(t.id, {})
            return (
                (parent_id is None or t.parent_id == parent_id)
                and (parent_id is not None or not top_level or t.parent_id is None)
                and (not statuses or t.status.value in statuses)
                and all(own.get(k) == v for k, v in labels)
                and (not text or _mentions(t, text))
                and (after is None or (t.id > after if oldest_first else t.id < after))
            )

        return [_out(t) for t in tasks if matches(t)][:limit]

    # --- dependencies

    def add_dependencies(self, task_id: int, deps: list[Dependency]) -> None:
        self._state.deps.update((task_id, d.upstream_id, d.kind) for d in deps)

    def dependencies(self, task_id: int) -> list[Dependency]:
        return self.dependencies_of([task_id])[task_id]

    def dependency_states(self, task_id: int) -> set[tuple[DependencyKind, TaskStatus | None]]:
        deps = self.dependencies(task_id)
        statuses = self.statuses([d.upstream_id for d in deps])
        return {(d.kind, statuses.get(d.upstream_id)) for d in deps}

    def dependencies_of(self, task_ids: list[int]) -> dict[int, list[Dependency]]:
        found: dict[int, list[Dependency]] = {t: [] for t in task_ids}
        for task_id, upstream, kind in sorted(self._state.deps):
            if task_id in found:
                found[task_id].append(Dependency(upstream, kind))
        return found

    def dependents_of(self, upstream_ids: list[int]) -> list[int]:
        wanted = set(upstream_ids)
        return sorted({t for t, u, _ in self._state.deps if u in wanted})

    def dependents(self, upstream_id: int) -> list[tuple[int, DependencyKind]]:
        return sorted((t, k) for t, u, k in self._state.deps if u == upstream_id)

    # --- attempts

    def record_attempt(self, task: Task, cpu: tuple[float, float] | None = None) -> None:
        self._state.attempts[(task.id, task.attempt)] = {
            "attempt": task.attempt,
            "started_at": task.started_at,
            "finished_at": task.finished_at,
            "exit_code": task.exit_code,
            "signal": task.signal,
            "reason": task.reason.value if task.reason else None,
        }
        self._state.attempt_cpu[(task.id, task.attempt)] = cpu

    def attempt_record(self, task_id: int, attempt: int) -> AttemptRecord | None:
        saved = self._state.attempts.get((task_id, attempt))
        if saved is None:
            return None
        return AttemptRecord(saved["started_at"], self._state.attempt_cpu.get((task_id, attempt)))

    def attempts(self, task_id: int) -> list[dict[str, Any]]:
        return [dict(a) for (t, _), a in sorted(self._state.attempts.items()) if t == task_id]

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self._all():
            counts[t.status.value] = counts.get(t.status.value, 0) + 1
        return counts

    def pool_counts(self) -> dict[str, dict[str, int]]:
        """pool -> status -> how many tasks, for every pool any stored task names."""
        counts: dict[str, dict[str, int]] = {}
        for t in self._all():
            pool = counts.setdefault(t.pool, {})
            pool[t.status.value] = pool.get(t.status.value, 0) + 1
        return counts


def _mentions(task: Task, text: str) -> bool:
    """`text` in the name or the command, any case, as SQL's LIKE '%text%' finds it."""
    needle = text.lower()
    return needle in (task.name or "").lower() or needle in json.dumps(task.command).lower()
