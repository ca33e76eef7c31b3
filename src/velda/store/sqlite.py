"""The task store: one SQLite file in WAL mode.

Used from the server's event loop thread only. Every change happens inside `transaction()`,
so a server killed at any moment leaves either all or none of a step on disk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from velda.models import (
    FINAL_STATES,
    Allocation,
    Children,
    Dependency,
    DependencyKind,
    Reason,
    Task,
    TaskStatus,
)

_FINAL_SQL = ",".join(f"'{s.value}'" for s in FINAL_STATES)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    parent_id INTEGER,
    name TEXT,
    status TEXT NOT NULL,
    pool TEXT NOT NULL,
    command TEXT NOT NULL,
    env TEXT NOT NULL,
    cwd TEXT NOT NULL,
    labels TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    timeout_s REAL,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    resolved_at REAL,
    blocking INTEGER NOT NULL DEFAULT 0,
    shard_id INTEGER,
    total_shards INTEGER,
    gang INTEGER NOT NULL DEFAULT 0,
    handle TEXT,
    alloc TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_parent ON tasks(parent_id, id);
CREATE INDEX IF NOT EXISTS tasks_parent_name ON tasks(parent_id, name, id);
CREATE INDEX IF NOT EXISTS tasks_parent_status ON tasks(parent_id, status);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(status) WHERE status NOT IN ({_FINAL_SQL});
CREATE TABLE IF NOT EXISTS deps (
    task_id INTEGER NOT NULL,
    upstream_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (task_id, upstream_id, kind)
);
CREATE INDEX IF NOT EXISTS deps_upstream ON deps(upstream_id);
CREATE TABLE IF NOT EXISTS labels (
    task_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_kv ON labels(key, value, task_id);
CREATE TABLE IF NOT EXISTS attempts (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    reason TEXT,
    PRIMARY KEY (task_id, attempt)
);
"""

_COLUMNS = (
    "id parent_id name status pool command env cwd labels priority attempt retries timeout_s "
    "exit_code signal reason created_at started_at finished_at resolved_at blocking shard_id "
    "total_shards gang handle alloc cancel_requested"
).split()
_JSON_COLUMNS = {"command", "env", "labels", "handle"}
# Reads leave out the environment, by far the largest column: only starting a task and its
# page need it (env_of). A task read back without it has an empty env.
_READ_COLUMNS = [c for c in _COLUMNS if c != "env"]
_READ = ",".join(_READ_COLUMNS)


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column == "alloc":
        return None if value is None else json.dumps(asdict(value))
    if isinstance(value, TaskStatus | Reason):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


def _decode(row: sqlite3.Row) -> Task:
    values = dict(zip(_READ_COLUMNS, row, strict=True))
    values["env"] = {}
    for column in _JSON_COLUMNS - {"env"}:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    if values["alloc"] is not None:
        alloc = json.loads(values["alloc"])
        values["alloc"] = Allocation(alloc["cpus"], tuple(alloc["gpu_ids"]), alloc["lender"])
    values["status"] = TaskStatus(values["status"])
    values["reason"] = Reason(values["reason"]) if values["reason"] else None
    for flag in ("blocking", "gang", "cancel_requested"):
        values[flag] = bool(values[flag])
    return Task(**values)


class SqliteStore:
    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(SCHEMA)
        self._depth = 0

    def close(self) -> None:
        self.db.close()

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
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0

    # --- tasks

    def insert(self, task: Task) -> int:
        columns = [c for c in _COLUMNS if c != "id"]
        values = [_encode(c, getattr(task, c)) for c in columns]
        marks = ",".join("?" * len(columns))
        cursor = self.db.execute(
            f"INSERT INTO tasks ({','.join(columns)}) VALUES ({marks})", values
        )
        assert cursor.lastrowid is not None
        task.id = cursor.lastrowid
        self.db.executemany(
            "INSERT INTO labels (task_id, key, value) VALUES (?, ?, ?)",
            [(task.id, k, v) for k, v in task.labels.items()],
        )
        return task.id

    def update(self, task: Task, *fields: str) -> None:
        sets = ",".join(f"{f}=?" for f in fields)
        values = [_encode(f, getattr(task, f)) for f in fields]
        self.db.execute(f"UPDATE tasks SET {sets} WHERE id=?", [*values, task.id])

    def get(self, task_id: int) -> Task | None:
        row = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        return _decode(row) if row else None

    def env_of(self, task_id: int) -> dict[str, str]:
        row = self.db.execute("SELECT env FROM tasks WHERE id=?", (task_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def get_many(self, ids: Iterable[int]) -> list[Task]:
        ids = list(ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE id IN ({marks})", ids
        ).fetchall()
        by_id = {t.id: t for t in map(_decode, rows)}
        return [by_id[i] for i in ids if i in by_id]

    def open_tasks(self) -> list[Task]:
        """Every task that is not final, oldest first."""
        rows = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE status NOT IN ({_FINAL_SQL}) "
            "ORDER BY id"
        ).fetchall()
        return [_decode(r) for r in rows]

    def newest_named(self, parent_id: int | None, name: str) -> Task | None:
        row = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE parent_id IS ? AND name=? "
            "ORDER BY id DESC LIMIT 1",
            (parent_id, name),
        ).fetchone()
        return _decode(row) if row else None

    def children(self, parent_id: int) -> list[Task]:
        rows = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE parent_id=? ORDER BY id", (parent_id,)
        ).fetchall()
        return [_decode(r) for r in rows]

    def open_children_count(self, parent_id: int) -> int:
        row = self.db.execute(
            f"SELECT COUNT(*) FROM tasks WHERE parent_id=? AND status NOT IN ({_FINAL_SQL})",
            (parent_id,),
        ).fetchone()
        return int(row[0])

    def children_counts(self, parent_ids: list[int]) -> dict[int, Children]:
        counts = {p: Children() for p in parent_ids}
        if not parent_ids:
            return counts
        marks = ",".join("?" * len(parent_ids))
        rows = self.db.execute(
            f"SELECT parent_id, status, COUNT(*) FROM tasks WHERE parent_id IN ({marks}) "
            "GROUP BY parent_id, status",
            parent_ids,
        )
        for parent_id, status, n in rows:
            counts[parent_id].count(TaskStatus(status), n)
        return counts

    def subtree_ids(self, root_id: int) -> list[int]:
        """root_id and all its descendants, parents before children."""
        rows = self.db.execute(
            "WITH RECURSIVE sub(id, depth) AS (SELECT ?, 0 UNION ALL "
            "SELECT t.id, sub.depth + 1 FROM tasks t JOIN sub ON t.parent_id = sub.id) "
            "SELECT id FROM sub ORDER BY depth, id",
            (root_id,),
        ).fetchall()
        return [r[0] for r in rows]

    def subtree_counts(self, root_id: int) -> Children:
        counts = Children()
        rows = self.db.execute(
            "WITH RECURSIVE sub(id) AS (SELECT id FROM tasks WHERE parent_id = ? UNION ALL "
            "SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) "
            "SELECT status, COUNT(*) FROM tasks WHERE id IN sub GROUP BY status",
            (root_id,),
        )
        for status, n in rows:
            counts.count(TaskStatus(status), n)
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
        where: list[str] = []
        args: list[object] = []
        oldest_first = parent_id is not None
        if parent_id is not None:
            where.append("parent_id = ?")
            args.append(parent_id)
        elif top_level:
            where.append("parent_id IS NULL")
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args += statuses
        for key, value in labels:
            where.append("id IN (SELECT task_id FROM labels WHERE key = ? AND value = ?)")
            args += [key, value]
        if text:
            where.append("(name LIKE ? OR command LIKE ?)")
            args += [f"%{text}%", f"%{text}%"]
        if after is not None:
            where.append("id > ?" if oldest_first else "id < ?")
            args.append(after)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        order = "ASC" if oldest_first else "DESC"
        rows = self.db.execute(
            f"SELECT {_READ} FROM tasks {clause} ORDER BY id {order} LIMIT ?",
            [*args, limit],
        ).fetchall()
        return [_decode(r) for r in rows]

    # --- dependencies

    def add_dependencies(self, task_id: int, deps: list[Dependency]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO deps (task_id, upstream_id, kind) VALUES (?, ?, ?)",
            [(task_id, d.upstream_id, d.kind.value) for d in deps],
        )

    def dependencies(self, task_id: int) -> list[Dependency]:
        rows = self.db.execute(
            "SELECT upstream_id, kind FROM deps WHERE task_id=? ORDER BY upstream_id", (task_id,)
        ).fetchall()
        return [Dependency(u, DependencyKind(k)) for u, k in rows]

    def dependencies_of(self, task_ids: list[int]) -> dict[int, list[Dependency]]:
        """The dependencies of many tasks in one query (a page of a list)."""
        found: dict[int, list[Dependency]] = {t: [] for t in task_ids}
        if not task_ids:
            return found
        marks = ",".join("?" * len(task_ids))
        rows = self.db.execute(
            f"SELECT task_id, upstream_id, kind FROM deps WHERE task_id IN ({marks}) "
            "ORDER BY task_id, upstream_id",
            task_ids,
        )
        for task_id, upstream, kind in rows:
            found[task_id].append(Dependency(upstream, DependencyKind(kind)))
        return found

    def dependents(self, upstream_id: int) -> list[tuple[int, DependencyKind]]:
        """(dependent task id, kind) of the tasks that depend on upstream_id."""
        rows = self.db.execute(
            "SELECT task_id, kind FROM deps WHERE upstream_id=? ORDER BY task_id", (upstream_id,)
        ).fetchall()
        return [(t, DependencyKind(k)) for t, k in rows]

    # --- attempts

    def record_attempt(self, task: Task) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO attempts "
            "(task_id, attempt, started_at, finished_at, exit_code, signal, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                task.id,
                task.attempt,
                task.started_at,
                task.finished_at,
                task.exit_code,
                task.signal,
                task.reason.value if task.reason else None,
            ),
        )

    def attempts(self, task_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT attempt, started_at, finished_at, exit_code, signal, reason FROM attempts "
            "WHERE task_id=? ORDER BY attempt",
            (task_id,),
        ).fetchall()
        keys = ("attempt", "started_at", "finished_at", "exit_code", "signal", "reason")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def status_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")
        return {status: n for status, n in rows}

    def count_in_pool(self, pool: str, statuses: tuple[TaskStatus, ...]) -> int:
        marks = ",".join("?" * len(statuses))
        row = self.db.execute(
            f"SELECT COUNT(*) FROM tasks WHERE pool = ? AND status IN ({marks})",
            [pool, *(s.value for s in statuses)],
        ).fetchone()
        return int(row[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
