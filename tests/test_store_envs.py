"""The SQLite store keeps each environment once, in `envs`, and reads every task's back:
tasks sharing one, a transaction rolled back after storing one, and rows of a store made
before `envs` existed (their environment in `tasks.env`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from velda.models import Task
from velda.store.sqlite import SqliteStore


def _task(env: dict[str, str], **fields: object) -> Task:
    return Task(id=0, pool="shell", command=["true"], cwd="/", env=env, **fields)  # type: ignore[arg-type]


def _envs_stored(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM envs").fetchone()[0])
    finally:
        db.close()


def test_tasks_sharing_an_environment_store_it_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "velda.db")
    a, b = {"PATH": "/bin", "HOME": "/root"}, {"PATH": "/usr/bin"}
    with store.transaction():
        first = [store.insert(_task(a)) for _ in range(50)]
        other = store.insert(_task(b))
        again = [store.insert(_task(dict(a))) for _ in range(50)]
    assert all(store.env_of(i) == a for i in first + again)
    assert store.env_of(other) == b
    store.close()
    assert _envs_stored(tmp_path / "velda.db") == 2


def test_an_environment_stored_in_a_rolled_back_transaction_is_stored_again(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "velda.db")
    lost, taken_over = {"WHO": "rolled back"}, {"WHO": "next"}
    with pytest.raises(RuntimeError), store.transaction():
        store.insert(_task(lost))
        raise RuntimeError("the submit failed after its insert")
    # the row id the rolled-back environment had goes to the next one stored
    next_id = store.insert(_task(taken_over))
    again = store.insert(_task(lost))
    assert store.env_of(next_id) == taken_over
    assert store.env_of(again) == lost
    store.close()


def test_a_store_made_before_envs_keeps_its_tasks_environments(tmp_path: Path) -> None:
    path = tmp_path / "velda.db"
    SqliteStore(path).close()
    old = sqlite3.connect(path)  # as a store made before envs: no table, no env_id column
    old.execute("DROP TABLE envs")
    old.execute("ALTER TABLE tasks DROP COLUMN env_id")
    old.execute(
        "INSERT INTO tasks (status, pool, command, env, cwd, labels, created_at) "
        "VALUES ('QUEUED', 'shell', '[\"true\"]', '{\"OLD\": \"1\"}', '/', '{}', 1.0)"
    )
    parent = old.execute("SELECT last_insert_rowid()").fetchone()[0]
    old.execute(  # a shard of it: shards read their parent's environment
        "INSERT INTO tasks (parent_id, shard_id, total_shards, name, status, pool, command, "
        "env, cwd, labels, created_at) "
        "VALUES (?, 0, 1, '0', 'QUEUED', 'shell', '[\"true\"]', '{}', '/', '{}', 1.0)",
        (parent,),
    )
    shard = old.execute("SELECT last_insert_rowid()").fetchone()[0]
    old.commit()
    old.close()

    store = SqliteStore(path)
    assert store.env_of(parent) == {"OLD": "1"}
    assert store.env_of(shard) == {"OLD": "1"}
    new = store.insert(_task({"NEW": "2"}))
    assert store.env_of(new) == {"NEW": "2"}
    store.close()


def test_new_stores_have_small_pages_and_older_ones_keep_theirs(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "new.db").close()
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("PRAGMA page_size=4096")
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE made_before (x)")
    old.close()
    store = SqliteStore(tmp_path / "old.db")
    task_id = store.insert(_task({"A": "1"}))
    assert store.env_of(task_id) == {"A": "1"}
    assert store.db.execute("PRAGMA page_size").fetchone()[0] == 4096
    store.close()
    new = sqlite3.connect(tmp_path / "new.db")
    assert new.execute("PRAGMA page_size").fetchone()[0] == 2048
    new.close()
