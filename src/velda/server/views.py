"""Tasks as the public JSON of SPEC §3.2."""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from velda.models import Children, Dependency, Task
from velda.store.sqlite import SqliteStore

_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL", re.IGNORECASE)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def task_json(
    task: Task, children: Children, store: SqliteStore, deps: list[Dependency] | None = None
) -> dict[str, Any]:
    deps = store.dependencies(task.id) if deps is None else deps
    return {
        "id": str(task.id),
        "name": task.name,
        "status": task.status.value,
        "pool": task.pool,
        "command": task.command,
        "cwd": task.cwd,
        "parent_id": None if task.parent_id is None else str(task.parent_id),
        "labels": task.labels,
        "priority": task.priority,
        "attempt": task.attempt,
        "retries": task.retries,
        "timeout_s": task.timeout_s,
        "exit_code": task.exit_code,
        "signal": task.signal,
        "reason": task.reason.value if task.reason else None,
        "created_at": rfc3339(task.created_at),
        "started_at": rfc3339(task.started_at),
        "finished_at": rfc3339(task.finished_at),
        "resolved_at": rfc3339(task.resolved_at),
        "depends_on": [{"id": str(d.upstream_id), "kind": d.kind.value} for d in deps],
        "children": asdict(children),
        "shard_id": task.shard_id,
        "total_shards": task.total_shards,
        "gang": task.gang,
    }


def task_detail(task: Task, store: SqliteStore) -> dict[str, Any]:
    """One task with what only its own page needs."""
    data = task_json(task, store.children_counts([task.id])[task.id], store)
    data["dependents"] = [
        {"id": str(t), "kind": kind.value} for t, kind in store.dependents(task.id)
    ]
    data["attempts"] = [
        {
            **a,
            "started_at": rfc3339(a["started_at"]),
            "finished_at": rfc3339(a["finished_at"]),
        }
        for a in store.attempts(task.id)
    ]
    data["ancestors"] = _ancestors(task, store)
    env = store.env_of(task.id)
    data["env"] = {k: "********" if _SECRET.search(k) else v for k, v in env.items()}
    return data


def _ancestors(task: Task, store: SqliteStore) -> list[dict[str, Any]]:
    chain = []
    parent_id = task.parent_id
    while parent_id is not None:
        parent = store.get(parent_id)
        if parent is None:
            break
        chain.append({"id": str(parent.id), "name": parent.name})
        parent_id = parent.parent_id
    return list(reversed(chain))


def tasks_json(tasks: list[Task], store: SqliteStore) -> list[dict[str, Any]]:
    ids = [t.id for t in tasks]
    counts, deps = store.children_counts(ids), store.dependencies_of(ids)
    return [task_json(t, counts[t.id], store, deps[t.id]) for t in tasks]
