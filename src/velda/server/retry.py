"""`velda task retry`: put a task that did not succeed back in line (SPEC §4.5).

A task whose own command failed or never ran goes back to PENDING (its dependencies are
checked again, then it queues with attempt+1). A parent whose own command succeeded keeps it:
only its failed or never-run descendants re-run, so a fan-out of 1,000 files where 3 failed
re-runs 3 tasks. Dependents that were decided by this task's end, and the ancestors, reopen.
"""

from __future__ import annotations

from collections import deque

from velda.models import NEVER_RAN_STATES, Task, TaskStatus
from velda.store.base import Store

S = TaskStatus


def reopen(store: Store, root: Task) -> list[int]:
    """Reopen root and what depends on its outcome; return the tasks to re-evaluate."""
    to_check: list[int] = []
    work = deque([root])
    seen: set[int] = set()
    while work:
        task = work.popleft()
        if task.id in seen or not task.status.is_final() or task.status == S.SUCCESS:
            continue
        seen.add(task.id)
        to_check += _reopen_one(store, task, work)
    for task_id in seen:
        reopened = store.get(task_id)
        if reopened is not None:
            _reopen_ancestors(store, reopened)
    return to_check


def _reopen_one(store: Store, task: Task, work: deque[Task]) -> list[int]:
    children = store.children(task.id)
    if task.own_succeeded and task.started_at is not None:
        task.status = S.RUNNING_SUBTASKS
        work.extend(c for c in children if c.status != S.SUCCESS)
    else:
        task.status = S.PENDING
        task.exit_code = task.signal = task.reason = None
        task.started_at = task.finished_at = None
        work.extend(c for c in children if c.status != S.SUCCESS)
    task.resolved_at, task.cancel_requested, task.handle = None, False, None
    task.submitted_at = task.stop_cause = None
    store.update(
        task, "status", "exit_code", "signal", "reason", "started_at", "finished_at",
        "resolved_at", "cancel_requested", "handle", "submitted_at", "stop_cause",
    )
    for dependent_id, _ in store.dependents(task.id):
        dependent = store.get(dependent_id)
        if dependent is not None and dependent.status in NEVER_RAN_STATES:
            work.append(dependent)
    return [task.id]


def _reopen_ancestors(store: Store, task: Task) -> None:
    parent_id = task.parent_id
    while parent_id is not None:
        parent = store.get(parent_id)
        if parent is None or not parent.status.is_final():
            return
        parent.status, parent.resolved_at, parent.cancel_requested = S.RUNNING_SUBTASKS, None, False
        store.update(parent, "status", "resolved_at", "cancel_requested")
        parent_id = parent.parent_id
