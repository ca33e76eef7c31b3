"""The task store: one SQLite file in WAL mode.

Used from the server's event loop thread only. Every change happens inside `transaction()`,
so a server killed at any moment leaves either all or none of a step on disk.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
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
from velda.store import clean
from velda.store.base import AttemptRecord, ChangeLog

_SQLITE_FULL = 13  # the primary result code of "database or disk is full"
_SQLITE_IOERR_SHMSIZE = 4874  # no room for the WAL's shared-memory file
_FINAL_SQL = ",".join(f"'{s.value}'" for s in FINAL_STATES)
# the others, named: a lookup of each in an index beside parent_id, where NOT IN reads them all
_OPEN_SQL = ",".join(f"'{s.value}'" for s in TaskStatus if s not in FINAL_STATES)

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
    cpu_user_s REAL,
    cpu_system_s REAL,
    PRIMARY KEY (task_id, attempt)
);
CREATE TABLE IF NOT EXISTS envs (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL
);
"""

# Kept out of Task: the key a client sent with the submit that made the task, and the key of
# the last retry applied to it, so a request repeated after a lost answer changes nothing;
# and env_id, the row of `envs` holding the task's environment (see SqliteStore._env_id).
# (reason_detail is a field of Task: why its attempt ended, in words.)
_ADDED_COLUMNS = (
    ("tasks", "idempotency_key", "TEXT"), ("tasks", "retry_key", "TEXT"),
    ("tasks", "reason_detail", "TEXT"), ("tasks", "submitted_at", "REAL"),
    ("tasks", "stop_cause", "TEXT"), ("tasks", "terminal", "TEXT"),
    ("tasks", "env_id", "INTEGER"),
    ("attempts", "cpu_user_s", "REAL"), ("attempts", "cpu_system_s", "REAL"),
)

# Stores made before submitted_at and stop_cause kept them as flags in the engine's handle: an
# attempt handed to an engine that places work was {"submitted": true} while QUEUED, and one
# velda stopped for its timeout had "timed_out". Moved once, with the columns.
_FLAGS_TO_COLUMNS = f"""
UPDATE tasks SET submitted_at = COALESCE(started_at, created_at)
 WHERE status NOT IN ({_FINAL_SQL}) AND json_extract(handle, '$.submitted') IS NOT NULL;
UPDATE tasks SET stop_cause = 'timeout'
 WHERE status NOT IN ({_FINAL_SQL}) AND json_extract(handle, '$.timed_out') IS NOT NULL;
UPDATE tasks SET submitted_at = started_at
 WHERE submitted_at IS NULL AND status = '{TaskStatus.RUNNING.value}';
"""

_COLUMNS = (
    "id parent_id name status pool command env cwd labels priority attempt retries timeout_s "
    "exit_code signal reason created_at started_at finished_at resolved_at blocking shard_id "
    "total_shards gang handle alloc cancel_requested reason_detail submitted_at stop_cause terminal"
).split()
assert set(_COLUMNS) == {f.name for f in fields(Task)}, "a Task field without its column"
_JSON_COLUMNS = {"command", "env", "labels", "handle"}
# Reads leave out the environment, by far the largest part of a task: only starting a task
# and its page need it (env_of). It is kept in envs (a task's column holds "{}"), or in this
# column for a task stored before envs existed. A task read back has an empty env.
_READ_COLUMNS = [c for c in _COLUMNS if c != "env"]
_READ = ",".join(_READ_COLUMNS)
_INSERTED = [c for c in _COLUMNS if c != "id"]
_INSERT = (f"INSERT INTO tasks ({','.join(_INSERTED)}, env_id) "
           f"VALUES ({','.join('?' * len(_INSERTED))}, ?)")
# Pages of a store made from now on. Each commit writes every page it changed in full to the
# WAL, and a task's life is a few small commits: with 2 KiB pages and the environment out of
# the row (envs), a flood writes 36 KiB a task, where it wrote 80 (docs/architecture.md,
# "What a task writes to the disk"). A store keeps the page size it was made with.
_PAGE_SIZE = 2048
# Environments kept for the next tasks that share one (a submitter's tasks do): its row in envs
_ENVS_KEPT = 64
_ENCODED = _JSON_COLUMNS | {"alloc", "terminal"}
_AS_IS = {str, int, float, type(None)}  # exactly these types: not a bool, not an enum


def _encode(column: str, value: Any) -> Any:
    if type(value) in _AS_IS and column not in _ENCODED:
        return value  # the most of a row, past every check below
    if column in _JSON_COLUMNS:
        return None if value is None else json.dumps(value)
    if column == "alloc":
        return None if value is None else json.dumps(asdict(value))
    if column == "terminal":
        return None if value is None else "{}x{}".format(*value)
    if isinstance(value, TaskStatus | Reason):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


def _decode(row: sqlite3.Row) -> Task:
    values = dict(zip(_READ_COLUMNS, row, strict=True))
    values["env"] = {}
    # Total: whatever a column holds, the task reads back as something showable (clean.py).
    values["command"] = clean.str_list(values["command"])
    values["labels"] = clean.str_dict(values["labels"])
    values["handle"] = clean.any_dict(values["handle"])
    values["timeout_s"] = clean.timeout(values["timeout_s"])
    alloc = clean.any_dict(values["alloc"])
    if alloc is not None:
        values["alloc"] = _allocation(alloc)
    values["status"] = clean.status(values["status"])
    values["reason"] = clean.reason(values["reason"])
    values["stop_cause"] = clean.reason(values["stop_cause"])
    values["terminal"] = clean.terminal(values["terminal"])
    for flag in ("blocking", "gang", "cancel_requested"):
        values[flag] = bool(values[flag])
    # Task(**values) without its __init__, which took half of a read: every field is set
    task = object.__new__(Task)
    task.__dict__.update(values)
    return task


class StoreFull(OSError):
    """No space left on the device holding the store; the transaction was rolled back.
    An OSError with errno ENOSPC, like a full disk met by any other write."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def is_disk_full(e: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full") or an OSError ENOSPC."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    if isinstance(e, sqlite3.DatabaseError):
        code = getattr(e, "sqlite_errorcode", None)
        return (code is not None and code & 0xFF == _SQLITE_FULL) or "disk is full" in str(e)
    return False


def _chunks(ids: list[int], size: int = 1000) -> Iterator[list[int]]:
    """Slices small enough for SQLite's limit on bound parameters."""
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def _marks(values: list[int]) -> str:
    return ",".join("?" * len(values))


def _allocation(alloc: dict[str, Any]) -> Allocation | None:
    try:
        return Allocation(float(alloc["cpus"]), tuple(int(g) for g in alloc["gpu_ids"]))
    except (KeyError, TypeError, ValueError):
        return None  # ignore "lender", and an allocation that does not parse


def _connect(path: Path, exclusive: bool) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute(f"PRAGMA page_size={_PAGE_SIZE}")  # a store that exists keeps its own
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opens the WAL index
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.changes = ChangeLog()
        try:
            self.db = _connect(self.path, exclusive=False)
        except sqlite3.OperationalError as e:
            if not (is_disk_full(e) or getattr(e, "sqlite_errorcode", 0) == _SQLITE_IOERR_SHMSIZE):
                raise
            # no room for the shared-memory index of the WAL: keep it in this process's memory
            # (only this server opens the store), so that a server starts on a full disk
            self.db = _connect(self.path, exclusive=True)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(SCHEMA)
        self._migrate()
        self.db.text_factory = clean.text_of
        self._depth = 0
        # the last environment read (its text, decoded) and written (its row in envs): a
        # submitter's tasks share theirs, so a flood decodes, encodes and stores it once
        self._env_read: tuple[str | None, dict[str, str]] = (None, {})
        self._env_written: tuple[dict[str, str] | None, str] = (None, "")
        self._env_ids: OrderedDict[str, int] = OrderedDict()
        self._repair()

    def _repair(self) -> None:
        """Rewrite rows a check at the door would refuse (written before it existed). Reads
        are total anyway, so a store that cannot be written now (a full disk) still opens."""
        try:
            with self.transaction():
                clean.repair(self.db)
        except StoreFull:
            pass

    def _migrate(self) -> None:
        """Columns added since the first release, added to a store made before them."""
        have = {(table, row[1]) for table in ("tasks", "attempts")
                for row in self.db.execute(f"PRAGMA table_info({table})")}
        for table, column, kind in _ADDED_COLUMNS:
            if (table, column) not in have:
                try:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as e:  # the one start-up write that must be
                    if is_disk_full(e):
                        raise StoreFull(self.path) from e
                    raise
        if ("tasks", "submitted_at") not in have:
            self.db.executescript(_FLAGS_TO_COLUMNS)
        self.db.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency_key ON tasks(idempotency_key) "
            "WHERE idempotency_key IS NOT NULL"
        )

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
            self.db.execute("COMMIT")
        except BaseException as e:
            # SQLite may have rolled back already (a full disk does that); a failed COMMIT
            # leaves the transaction open
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self._env_ids.clear()  # rows of envs it wrote are gone with it
            if is_disk_full(e):
                raise StoreFull(self.path) from e
            raise
        finally:
            self._depth = 0

    # --- tasks

    def insert(self, task: Task) -> int:
        row = [_encode(c, getattr(task, c)) if c != "env" else "{}" for c in _INSERTED]
        cursor = self.db.execute(_INSERT, [*row, self._env_id(task.env)])
        assert cursor.lastrowid is not None
        task.id = cursor.lastrowid
        self.db.executemany(
            "INSERT INTO labels (task_id, key, value) VALUES (?, ?, ?)",
            [(task.id, k, v) for k, v in task.labels.items()],
        )
        return task.id

    def _env_id(self, env: dict[str, str]) -> int:
        """The row of `envs` that holds `env`, stored now unless a task stored it lately.

        A task's environment is by far the largest part of it (kilobytes), and the tasks of
        one submitter share theirs. Kept out of the task's row, it is written once for them,
        and every later write of the row (its start, its end) rewrites a few hundred bytes
        instead. Rows of tasks stored before envs existed keep theirs in `tasks.env`."""
        if env != self._env_written[0]:
            self._env_written = (dict(env), json.dumps(env))
        text = self._env_written[1]
        env_id = self._env_ids.get(text)
        if env_id is None:
            cursor = self.db.execute("INSERT INTO envs (text) VALUES (?)", (text,))
            assert cursor.lastrowid is not None
            env_id = self._env_ids[text] = cursor.lastrowid
            if len(self._env_ids) > _ENVS_KEPT:
                self._env_ids.popitem(last=False)
        else:
            self._env_ids.move_to_end(text)
        return env_id

    def insert_shards(self, template: Task, count: int) -> None:
        """`count` shards of one parent, each `template` with its own shard_id and name, in
        one INSERT ... SELECT and their labels in one more per label: the rows are made inside
        SQLite, not sent one by one. The environment is not stored again for each shard
        (env_of reads the parent's)."""
        columns = [c for c in _COLUMNS if c not in ("id", "name", "shard_id")]
        values = [_encode(c, getattr(template, c)) for c in columns]
        values[columns.index("env")] = "{}"
        marks = ",".join("?" * len(columns))
        self.db.execute(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?) "
            f"INSERT INTO tasks ({','.join(columns)}, name, shard_id) "
            f"SELECT {marks}, CAST(i AS TEXT), i FROM n ORDER BY i",
            [count, *values],
        )
        for key, value in template.labels.items():
            self.db.execute(
                "INSERT INTO labels (task_id, key, value) SELECT id, ?, ? FROM tasks "
                "WHERE parent_id = ? AND shard_id IS NOT NULL",
                (key, value, template.parent_id),
            )

    def pending_children(self, parent_id: int) -> list[int]:
        rows = self.db.execute(
            "SELECT id FROM tasks WHERE parent_id=? AND status=? ORDER BY id",
            (parent_id, TaskStatus.PENDING.value),
        )
        return [r[0] for r in rows]

    def queue_pending(self, ids: list[int]) -> list[tuple[int, int | None]]:
        """Those of `ids` PENDING and not asked to cancel become QUEUED, in one statement;
        (id, shard_id) of each, in ID order."""
        rows = self.db.execute(
            f"UPDATE tasks SET status=? WHERE id IN ({_marks(ids)}) AND status=? "
            "AND cancel_requested=0 RETURNING id, shard_id",
            [TaskStatus.QUEUED.value, *ids, TaskStatus.PENDING.value],
        ).fetchall()
        self.changes.note(r[0] for r in rows)
        return sorted(rows)

    def unstarted_children(self, parent_id: int) -> list[int]:
        """Children PENDING or QUEUED that never started: IDs only, so a parent with 10,000
        finished shards costs one indexed query."""
        rows = self.db.execute(
            "SELECT id FROM tasks WHERE parent_id=? AND status IN (?, ?) AND started_at IS NULL "
            "ORDER BY id",
            (parent_id, TaskStatus.PENDING.value, TaskStatus.QUEUED.value),
        )
        return [r[0] for r in rows]

    def request_cancel(self, ids: list[int]) -> None:
        """Mark the open tasks of `ids` as asked to cancel, a thousand per statement."""
        self.changes.note(ids)
        for chunk in _chunks(ids):
            self.db.execute(
                f"UPDATE tasks SET cancel_requested=1 WHERE id IN ({_marks(chunk)}) "
                f"AND status NOT IN ({_FINAL_SQL})",
                chunk,
            )

    def cancel_waiting(self, ids: list[int], now: float) -> list[tuple[int, int | None]]:
        """Of `ids`, those PENDING or QUEUED and not handed to an engine become CANCELLED, a
        thousand per statement; (id, parent_id) of each."""
        ended: list[tuple[int, int | None]] = []
        for chunk in _chunks(ids):
            ended += self.db.execute(
                "UPDATE tasks SET status=?, resolved_at=?, cancel_requested=1 "
                f"WHERE id IN ({_marks(chunk)}) AND status IN (?, ?) "
                "AND submitted_at IS NULL AND handle IS NULL RETURNING id, parent_id",
                [TaskStatus.CANCELLED.value, now, *chunk, TaskStatus.PENDING.value,
                 TaskStatus.QUEUED.value],
            ).fetchall()
        self.changes.note(task_id for task_id, _ in ended)
        return ended

    def update(self, task: Task, *fields: str) -> None:
        sets = ",".join(f"{f}=?" for f in fields)
        values = [_encode(f, getattr(task, f)) for f in fields]
        self.db.execute(f"UPDATE tasks SET {sets} WHERE id=?", [*values, task.id])
        self.changes.note((task.id,))

    def get(self, task_id: int) -> Task | None:
        row = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE id=?", (task_id,)
        ).fetchone()
        return _decode(row) if row else None

    def by_idempotency_key(self, key: str) -> Task | None:
        row = self.db.execute(
            f"SELECT {_READ} FROM tasks WHERE idempotency_key=?", (key,)
        ).fetchone()
        return _decode(row) if row else None

    def set_idempotency_key(self, task_id: int, key: str) -> None:
        self.db.execute("UPDATE tasks SET idempotency_key=? WHERE id=?", (key, task_id))

    def retry_key(self, task_id: int) -> str | None:
        row = self.db.execute("SELECT retry_key FROM tasks WHERE id=?", (task_id,)).fetchone()
        return row[0] if row else None

    def set_retry_key(self, task_id: int, key: str) -> None:
        self.db.execute("UPDATE tasks SET retry_key=? WHERE id=?", (key, task_id))

    def env_of(self, task_id: int) -> dict[str, str]:
        """A shard stores no environment of its own: it has its parent's (insert_shards)."""
        row = self.db.execute(
            "SELECT COALESCE(e.text, t.env), t.shard_id, COALESCE(pe.text, p.env) FROM tasks t "
            "LEFT JOIN envs e ON e.id = t.env_id LEFT JOIN tasks p ON p.id = t.parent_id "
            "LEFT JOIN envs pe ON pe.id = p.env_id WHERE t.id=?",
            (task_id,),
        ).fetchone()
        if row is None:
            return {}
        own, shard_id, parents = row
        text = parents if shard_id is not None and parents else own
        if text != self._env_read[0]:  # tasks of one submitter share it: read it once
            self._env_read = (text, clean.str_dict(text))
        return dict(self._env_read[1])

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

    def statuses(self, ids: list[int]) -> dict[int, TaskStatus]:
        found: dict[int, TaskStatus] = {}
        for chunk in _chunks(ids):
            rows = self.db.execute(
                f"SELECT id, status FROM tasks WHERE id IN ({_marks(chunk)})", chunk
            )
            found.update((task_id, clean.status(status)) for task_id, status in rows)
        return found

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

    def has_open_children(self, parent_id: int) -> bool:
        row = self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE parent_id=? AND status IN "
            f"({_OPEN_SQL}))", (parent_id,),
        ).fetchone()
        return bool(row[0])

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
            counts[parent_id].count(clean.status(status), n)
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

    def last_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM tasks").fetchone()
        return int(row[0] or 0)

    def ancestor_ids(self, task_id: int) -> list[int]:
        """The parent of task_id, its parent, and so on to the top level: nearest first,
        in one query."""
        rows = self.db.execute(
            "WITH RECURSIVE up(id, depth) AS (SELECT parent_id, 1 FROM tasks WHERE id = ? "
            "UNION ALL SELECT t.parent_id, up.depth + 1 FROM tasks t JOIN up ON t.id = up.id) "
            "SELECT id FROM up WHERE id IS NOT NULL ORDER BY depth",
            (task_id,),
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
            counts.count(clean.status(status), n)
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

    def dependency_states(self, task_id: int) -> set[tuple[DependencyKind, TaskStatus | None]]:
        rows = self.db.execute(
            "SELECT DISTINCT d.kind, t.status FROM deps d LEFT JOIN tasks t ON t.id=d.upstream_id "
            "WHERE d.task_id=?", (task_id,),
        )
        return {(DependencyKind(kind), None if status is None else clean.status(status))
                for kind, status in rows}

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

    def dependents_of(self, upstream_ids: list[int]) -> list[int]:
        """The tasks that depend on any of `upstream_ids`, each once."""
        found: set[int] = set()
        for chunk in _chunks(upstream_ids):
            rows = self.db.execute(
                f"SELECT task_id FROM deps WHERE upstream_id IN ({_marks(chunk)})", chunk
            )
            found.update(r[0] for r in rows)
        return sorted(found)

    def dependents(self, upstream_id: int) -> list[tuple[int, DependencyKind]]:
        """(dependent task id, kind) of the tasks that depend on upstream_id."""
        rows = self.db.execute(
            "SELECT task_id, kind FROM deps WHERE upstream_id=? ORDER BY task_id", (upstream_id,)
        ).fetchall()
        return [(t, DependencyKind(k)) for t, k in rows]

    # --- attempts

    def record_attempt(self, task: Task, cpu: tuple[float, float] | None = None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO attempts (task_id, attempt, started_at, finished_at, "
            "exit_code, signal, reason, cpu_user_s, cpu_system_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.id,
                task.attempt,
                task.started_at,
                task.finished_at,
                task.exit_code,
                task.signal,
                task.reason.value if task.reason else None,
                *(cpu or (None, None)),
            ),
        )

    def attempt_record(self, task_id: int, attempt: int) -> AttemptRecord | None:
        row = self.db.execute(
            "SELECT started_at, cpu_user_s, cpu_system_s FROM attempts "
            "WHERE task_id=? AND attempt=?", (task_id, attempt)).fetchone()
        if row is None:
            return None
        started_at, user, system = row
        return AttemptRecord(started_at, None if user is None else (user, system or 0.0))

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

    def pool_counts(self) -> dict[str, dict[str, int]]:
        """pool -> status -> how many tasks, for every pool any stored task names."""
        counts: dict[str, dict[str, int]] = {}
        for pool, status, n in self.db.execute(
            "SELECT pool, status, COUNT(*) FROM tasks GROUP BY pool, status"
        ):
            counts.setdefault(pool, {})[status] = n
        return counts

    def count_in_pool(self, pool: str, statuses: tuple[TaskStatus, ...]) -> int:
        marks = ",".join("?" * len(statuses))
        row = self.db.execute(
            f"SELECT COUNT(*) FROM tasks WHERE pool = ? AND status IN ({marks})",
            [pool, *(s.value for s in statuses)],
        ).fetchone()
        return int(row[0])

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
