"""Tasks as the public JSON of SPEC §3.2."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from velda.models import Children, Dependency, Task, TaskStatus
from velda.store.base import Store

_SECRET = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASS$|KEY|CREDENTIAL|AUTH|PRIVATE|COOKIE",
    re.IGNORECASE,
)
_URL_PASSWORD = re.compile(r"(\w+://[^/:@\s]*:)[^@/\s]+@")  # scheme://user:PASSWORD@host
MASK = "********"
_WAITS = (TaskStatus.PENDING, TaskStatus.QUEUED)
_CHILDREN_FIELDS = [f.name for f in fields(Children)]

# Why a PENDING or QUEUED task waits (server/waiting.py): installed by the HTTP app, which
# knows the runtime; computed only for tasks that wait.
explain_waiting: Callable[[Task, list[Dependency]], dict[str, Any] | None] | None = None
# What one attempt (task ID, attempt, when it ended) used (server/usage.py), or None where
# nothing was measured: installed by the HTTP app too.
attempt_usage: Callable[[int, int, float | None], dict[str, Any] | None] | None = None
# What every attempt below a parent used, summed (usage.SubtreeUsage); installed likewise.
subtree_usage: Callable[[Task], dict[str, Any] | None] | None = None
# The ports forwarded to a task now (server/ports.py), [{"port", "local"}]; installed likewise.
forwarded_ports: Callable[[int], list[dict[str, int | None]]] | None = None


def rfc3339(ts: float | None) -> str | None:
    """None for a time that is missing or not a time (a row written by hand, say)."""
    if not isinstance(ts, int | float) or not 0 <= ts < 253402300800:  # before year 10000
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def task_json(
    task: Task, children: Children, store: Store, deps: list[Dependency] | None = None
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
        "reason_detail": task.reason_detail,
        "created_at": rfc3339(task.created_at),
        "started_at": rfc3339(task.started_at),
        "finished_at": rfc3339(task.finished_at),
        "resolved_at": rfc3339(task.resolved_at),
        "depends_on": [{"id": str(d.upstream_id), "kind": d.kind.value} for d in deps],
        "children": _counts(children),
        "shard_id": task.shard_id,
        "total_shards": task.total_shards,
        "gang": task.gang,
        "terminal": _terminal(task.terminal),
        "waiting_for": _waiting_for(task, deps),
        "usage": _usage(task),
    }


def _counts(children: Children) -> dict[str, int]:
    """asdict(children), without its deep copy of every count."""
    return {name: getattr(children, name) for name in _CHILDREN_FIELDS}


def _terminal(size: tuple[int, int] | None) -> dict[str, int] | None:
    return None if size is None else {"rows": size[0], "cols": size[1]}


def _usage(task: Task) -> dict[str, Any] | None:
    if task.started_at is None or attempt_usage is None:
        return None
    return attempt_usage(task.id, task.attempt, task.finished_at)


def _attempt_usage(task: Task, attempt: dict[str, Any]) -> dict[str, Any] | None:
    if attempt_usage is None or attempt["started_at"] is None:
        return None
    return attempt_usage(task.id, attempt["attempt"], attempt["finished_at"])


def _waiting_for(task: Task, deps: list[Dependency]) -> dict[str, Any] | None:
    if task.status not in _WAITS or explain_waiting is None:
        return None
    return explain_waiting(task, deps)


def task_detail(task: Task, store: Store, show_env: bool = False) -> dict[str, Any]:
    """One task with what only its own page needs; secret-looking environment values
    masked unless `show_env` (which only the server token may ask for)."""
    data = task_json(task, store.children_counts([task.id])[task.id], store)
    data["dependents"] = [
        {"id": str(t), "kind": kind.value} for t, kind in store.dependents(task.id)
    ]
    data["attempts"] = [
        {
            **a,
            "started_at": rfc3339(a["started_at"]),
            "finished_at": rfc3339(a["finished_at"]),
            "usage": _attempt_usage(task, a),
        }
        for a in _with_causes(store.attempts(task.id), task.retries)
    ]
    data["ancestors"] = _ancestors(task, store)
    data["subtree_usage"] = None if subtree_usage is None else subtree_usage(task)
    data["forwarded_ports"] = [] if forwarded_ports is None else forwarded_ports(task.id)
    env = store.env_of(task.id)
    data["env"] = env if show_env else {k: masked(k, v) for k, v in env.items()}
    return data


def masked(key: str, value: str) -> str:
    """A secret-looking variable's value hidden, as are passwords inside URLs."""
    if _SECRET.search(key):
        return MASK
    return _URL_PASSWORD.sub(rf"\1{MASK}@", value)


def _with_causes(attempts: list[dict[str, Any]], retries: int) -> list[dict[str, Any]]:
    """Each attempt with what started it: `first`, `retry` (automatic, --retries) or
    `hand` (velda task retry). The runtime retries by itself exactly when the attempt before
    failed, was not cancelled and had retries left (Runtime._should_retry), so any other
    new attempt was asked for by hand."""
    out, previous = [], None
    for a in attempts:
        if previous is None:
            cause = "first"
        elif previous["reason"] not in (None, "cancelled") and previous["attempt"] <= retries:
            cause = "retry"
        else:
            cause = "hand"
        out.append({**a, "cause": cause})
        previous = a
    return out


def _ancestors(task: Task, store: Store) -> list[dict[str, Any]]:
    chain = store.get_many(store.ancestor_ids(task.id))
    return [{"id": str(parent.id), "name": parent.name} for parent in reversed(chain)]


def submitted_json(task: Task) -> dict[str, Any]:
    """A task as a bulk submit answers it: enough to follow it up by ID."""
    return {"id": str(task.id), "name": task.name, "status": task.status.value,
            "pool": task.pool}


def tasks_json(tasks: list[Task], store: Store) -> list[dict[str, Any]]:
    ids = [t.id for t in tasks]
    counts, deps = store.children_counts(ids), store.dependencies_of(ids)
    return [task_json(t, counts[t.id], store, deps[t.id]) for t in tasks]


CANNOT_START = (126, 127)  # a shell's codes for "not executable" and "not found"


def start_failure(task: Task, stderr_path: Path) -> str | None:
    """Why a command could not start, in the words the engine wrote as the last line of its
    stderr (`velda: cannot run 'x': command not found`, given without `velda: `), for a task
    that ended 126 or 127: every engine writes that line, none needs to store it."""
    if task.exit_code not in CANNOT_START or task.signal is not None:
        return None
    try:
        with open(stderr_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 512))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    last = lines[-1] if lines else ""
    return last.removeprefix("velda: ") if last.startswith("velda: ") else None
