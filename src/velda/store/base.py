"""The store contract: what the server needs of a place that keeps tasks.

SqliteStore (sqlite.py) is the store of a real server; MemoryStore (memory.py) keeps the same
promises in dicts, for tests. tests/test_store_contract.py runs one suite on both.

Writes made outside `transaction()` take effect at once; inside it, all or none of them do.
Reads return copies: changing a returned Task changes nothing stored until `update()`. A task
read back has an empty `env` (it is the largest part of a task): `env_of` reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from velda.models import Children, Dependency, DependencyKind, Task, TaskStatus


class ChangeLog:
    """The IDs of the tasks whose rows a store changed, kept until the server takes them to
    wake whoever follows those tasks (server/notifier.py). A change rolled back stays noted:
    it wakes a follower for nothing, never the other way round."""

    def __init__(self) -> None:
        self._ids: set[int] = set()

    def note(self, ids: Iterable[int]) -> None:
        self._ids.update(ids)

    def take(self) -> set[int]:
        ids, self._ids = self._ids, set()
        return ids


@dataclass(frozen=True)
class AttemptRecord:
    started_at: float | None
    cpu: tuple[float, float] | None  # (user, system) seconds, where its engine gave them


class Store(Protocol):
    changes: ChangeLog  # the tasks whose rows changed: update, queue_pending, the cancels

    def close(self) -> None:
        """Release the store; no call may follow."""

    def transaction(self) -> AbstractContextManager[None]:
        """Keep every write of the block, or none if it raises; a nested one joins the outer."""

    # --- tasks

    def insert(self, task: Task) -> int:
        """Store `task` under a new ID, higher than any given before; sets and returns task.id."""

    def insert_shards(self, template: Task, count: int) -> None:
        """`count` children of template.parent_id, shard_id and name 0..count-1, IDs in order."""

    def update(self, task: Task, *fields: str) -> None:
        """Write the named fields of `task` to the stored task of the same ID."""

    def get(self, task_id: int) -> Task | None:
        """The task, or None if no task has that ID."""

    def get_many(self, ids: Iterable[int]) -> list[Task]:
        """The tasks of `ids` that exist, in the order of `ids`."""

    def statuses(self, ids: list[int]) -> dict[int, TaskStatus]:
        """The status of each of `ids` that exists: what a caller needing only that reads
        instead of whole tasks."""

    def env_of(self, task_id: int) -> dict[str, str]:
        """The task's environment; a shard's is its parent's. Empty for an unknown task."""

    def pending_children(self, parent_id: int) -> list[int]:
        """IDs of the PENDING children of `parent_id`, ascending."""

    def unstarted_children(self, parent_id: int) -> list[int]:
        """IDs of the PENDING or QUEUED children that never started, ascending."""

    def queue_pending(self, ids: list[int]) -> list[tuple[int, int | None]]:
        """Those of `ids` PENDING and not asked to cancel become QUEUED; (id, shard_id), by ID."""

    def request_cancel(self, ids: list[int]) -> None:
        """Mark the tasks of `ids` that are not final as asked to cancel."""

    def cancel_waiting(self, ids: list[int], now: float) -> list[tuple[int, int | None]]:
        """Those of `ids` PENDING or QUEUED and not handed to an engine (neither
        `submitted_at` nor a handle) become CANCELLED at `now`; (id, parent_id) of each."""

    def open_tasks(self) -> list[Task]:
        """Every task that is not final, by ID."""

    def newest_named(self, parent_id: int | None, name: str) -> Task | None:
        """The task of the highest ID with that name under that parent (None: top level)."""

    def children(self, parent_id: int) -> list[Task]:
        """The children of `parent_id`, by ID."""

    def has_open_children(self, parent_id: int) -> bool:
        """Whether a child of `parent_id` is not final (a lookup for each open state, not a
        count of all its children: it is asked at each child's end)."""

    def children_counts(self, parent_ids: list[int]) -> dict[int, Children]:
        """For each of `parent_ids` (those without children too), its children by state."""

    def subtree_ids(self, root_id: int) -> list[int]:
        """root_id and all its descendants, by depth, then by ID."""

    def ancestor_ids(self, task_id: int) -> list[int]:
        """The parent of task_id, its parent, and so on: nearest first."""

    def subtree_counts(self, root_id: int) -> Children:
        """All descendants of root_id (not itself) by state."""

    def last_id(self) -> int:
        """The highest ID in the store, 0 when empty."""

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
        """Up to `limit` tasks matching every filter (text: in the name or command, any case);
        children of parent_id by ID after `after`, else newest first, below `after`."""

    # --- keys that make a repeated request change nothing

    def by_idempotency_key(self, key: str) -> Task | None:
        """The task whose submit carried `key`, if any."""

    def set_idempotency_key(self, task_id: int, key: str) -> None:
        """Remember `key` as the submit key of the task."""

    def retry_key(self, task_id: int) -> str | None:
        """The key of the last retry applied to the task, if any."""

    def set_retry_key(self, task_id: int, key: str) -> None:
        """Remember `key` as the key of the last retry of the task."""

    # --- dependencies

    def add_dependencies(self, task_id: int, deps: list[Dependency]) -> None:
        """Make task_id wait on each of `deps`; one already there is kept once."""

    def dependencies(self, task_id: int) -> list[Dependency]:
        """What task_id waits on, by upstream ID."""

    def dependencies_of(self, task_ids: list[int]) -> dict[int, list[Dependency]]:
        """dependencies() of each of `task_ids`, those with none too."""

    def dependency_states(self, task_id: int) -> set[tuple[DependencyKind, TaskStatus | None]]:
        """Each (kind, upstream's status) among task_id's dependencies, once (None: an upstream
        not stored): what decides whether it may run, in one query however many it has (a
        fan-in is asked at the end of each of its upstreams)."""

    def dependents(self, upstream_id: int) -> list[tuple[int, DependencyKind]]:
        """(task id, kind) of the tasks that wait on upstream_id, by task ID."""

    def dependents_of(self, upstream_ids: list[int]) -> list[int]:
        """IDs of the tasks waiting on any of `upstream_ids`, each once, ascending."""

    # --- attempts and counts

    def record_attempt(self, task: Task, cpu: tuple[float, float] | None = None) -> None:
        """Save how the task's current attempt went, replacing an earlier save of it. `cpu`:
        its command's CPU seconds (user, system), where its engine read them as it ended."""

    def attempt_record(self, task_id: int, attempt: int) -> AttemptRecord | None:
        """When that attempt started and what CPU it used, as saved; None if never saved."""

    def attempts(self, task_id: int) -> list[dict[str, Any]]:
        """The saved attempts of the task by number: attempt, started_at, finished_at,
        exit_code, signal, reason (a string)."""

    def status_counts(self) -> dict[str, int]:
        """status -> how many tasks, for the states some task is in."""

    def pool_counts(self) -> dict[str, dict[str, int]]:
        """pool -> status -> how many tasks, for every pool any stored task names."""
