"""One suite, every store: what the server may count on from SqliteStore and MemoryStore alike."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from velda.models import Children, Dependency, DependencyKind, Reason, Task, TaskStatus
from velda.store.base import Store
from velda.store.memory import MemoryStore
from velda.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store = SqliteStore(tmp_path / "velda.db") if request.param == "sqlite" else MemoryStore()
    yield made
    made.close()


def _present(task: Task | None) -> Task:
    assert task is not None
    return task


def _get(store: Store, task_id: int) -> Task:
    return _present(store.get(task_id))


def _task(**fields: object) -> Task:
    values: dict[str, object] = {
        "id": 0, "pool": "default", "command": ["echo", "hi"], "cwd": "/", "env": {"A": "1"},
    }
    values.update(fields)
    return Task(**values)  # type: ignore[arg-type]


def _add(store: Store, **fields: object) -> int:
    return store.insert(_task(**fields))


def test_insert_get_update_round_trip(store: Store) -> None:
    task = _task(name="train", labels={"team": "ml"}, priority=3, timeout_s=9.5, gang=True)
    task_id = store.insert(task)
    assert task.id == task_id
    got = store.get(task_id)
    assert got is not None
    assert (got.name, got.labels, got.priority, got.timeout_s, got.gang) == (
        "train", {"team": "ml"}, 3, 9.5, True
    )
    assert got.env == {} and store.env_of(task_id) == {"A": "1"}
    got.status, got.exit_code = TaskStatus.SUCCESS, 0
    assert _get(store, task_id).status == TaskStatus.PENDING
    store.update(got, "status", "exit_code")
    again = store.get(task_id)
    assert again is not None and (again.status, again.exit_code) == (TaskStatus.SUCCESS, 0)
    assert store.get(task_id + 100) is None
    assert store.env_of(task_id + 100) == {}


def test_ids_increase_and_get_many_keeps_order(store: Store) -> None:
    assert store.last_id() == 0
    ids = [_add(store) for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.last_id() == ids[-1]
    assert [t.id for t in store.get_many([ids[2], 999, ids[0]])] == [ids[2], ids[0]]
    assert store.get_many([]) == []


def test_statuses_are_the_stored_ones_of_the_tasks_that_exist(store: Store) -> None:
    queued, pending = _add(store, status=TaskStatus.QUEUED), _add(store)
    assert store.statuses([pending, 999, queued, pending]) == {
        queued: TaskStatus.QUEUED, pending: TaskStatus.PENDING,
    }
    assert store.statuses([]) == {}
    many = [_add(store) for _ in range(1200)]  # past one statement's share of IDs
    assert store.statuses(many) == dict.fromkeys(many, TaskStatus.PENDING)


def test_submitted_at_and_stop_cause_round_trip(store: Store) -> None:
    task_id = _add(store)
    task = store.get(task_id)
    assert task is not None and task.submitted_at is None and task.stop_cause is None
    task.submitted_at, task.stop_cause = 12.5, Reason.TIMEOUT
    store.update(task, "submitted_at", "stop_cause")
    again = store.get(task_id)
    assert again is not None and (again.submitted_at, again.stop_cause) == (12.5, Reason.TIMEOUT)


def test_shards_take_the_parent_env_and_queue_once(store: Store) -> None:
    parent = _add(store, env={"P": "x"}, command=[])
    store.insert_shards(_task(parent_id=parent, env={"P": "x"}, labels={"k": "v"}), 3)
    shards = store.children(parent)
    assert [(t.name, t.shard_id) for t in shards] == [("0", 0), ("1", 1), ("2", 2)]
    assert all(t.labels == {"k": "v"} for t in shards)
    assert store.env_of(shards[1].id) == {"P": "x"}
    ids = store.pending_children(parent)
    assert ids == [t.id for t in shards]
    store.request_cancel([ids[1]])
    assert store.queue_pending(ids) == [(ids[0], 0), (ids[2], 2)]
    assert store.queue_pending(ids) == []
    assert store.pending_children(parent) == [ids[1]]
    assert store.unstarted_children(parent) == ids


def test_cancel_waiting_leaves_started_and_final_tasks(store: Store) -> None:
    parent = _add(store)
    waiting = _add(store, parent_id=parent)
    queued = _add(store, parent_id=parent, status=TaskStatus.QUEUED)
    handed = _add(store, status=TaskStatus.QUEUED, submitted_at=4.0, handle={"pid": 1})
    taking = _add(store, status=TaskStatus.QUEUED, submitted_at=4.0)  # no handle yet
    older = _add(store, status=TaskStatus.QUEUED, handle={"job": 7})  # stored before submitted_at
    done = _add(store, status=TaskStatus.SUCCESS)
    ended = store.cancel_waiting([waiting, queued, handed, taking, older, done], now=5.0)
    assert sorted(ended) == [(waiting, parent), (queued, parent)]
    cancelled = store.get(waiting)
    assert cancelled is not None
    assert (cancelled.status, cancelled.resolved_at, cancelled.cancel_requested) == (
        TaskStatus.CANCELLED, 5.0, True
    )
    assert {_get(store, t).status for t in (handed, taking, older)} == {TaskStatus.QUEUED}


def test_request_cancel_marks_only_open_tasks(store: Store) -> None:
    running = _add(store, status=TaskStatus.RUNNING)
    done = _add(store, status=TaskStatus.FAILURE)
    store.request_cancel([running, done, 999])
    assert _get(store, running).cancel_requested
    assert not _get(store, done).cancel_requested


def test_dependencies_and_dependents(store: Store) -> None:
    a, b, c = _add(store), _add(store), _add(store)
    store.add_dependencies(
        c, [Dependency(b, DependencyKind.FAIL), Dependency(a, DependencyKind.ANY)]
    )
    store.add_dependencies(c, [Dependency(a, DependencyKind.ANY)])  # repeated: kept once
    store.add_dependencies(b, [Dependency(a, DependencyKind.SUCCESS)])
    assert store.dependencies(c) == [
        Dependency(a, DependencyKind.ANY), Dependency(b, DependencyKind.FAIL)
    ]
    assert store.dependencies_of([b, c, a]) == {
        b: [Dependency(a, DependencyKind.SUCCESS)],
        c: [Dependency(a, DependencyKind.ANY), Dependency(b, DependencyKind.FAIL)],
        a: [],
    }
    assert store.dependents(a) == [(b, DependencyKind.SUCCESS), (c, DependencyKind.ANY)]
    assert store.dependents_of([a, b]) == [b, c]
    assert store.dependents_of([]) == []


def test_children_counts_and_tree(store: Store) -> None:
    root = _add(store)
    kid = _add(store, parent_id=root, status=TaskStatus.RUNNING_SUBTASKS)
    _add(store, parent_id=root, status=TaskStatus.SKIPPED)
    grandkids = [
        _add(store, parent_id=kid, status=s)
        for s in (TaskStatus.SUCCESS, TaskStatus.FAILED_UPSTREAM, TaskStatus.QUEUED)
    ]
    other = _add(store)
    counts = store.children_counts([root, kid, other])
    assert counts[root] == Children(total=2, skipped=1, running=1)
    assert counts[kid] == Children(total=3, succeeded=1, failed=1, queued=1)
    assert counts[other] == Children()
    assert store.has_open_children(root) and store.has_open_children(kid)
    assert not store.has_open_children(other) and not store.has_open_children(kid + 1)
    assert store.subtree_counts(root) == Children(
        total=5, succeeded=1, failed=1, skipped=1, running=1, queued=1
    )
    assert store.subtree_ids(root) == [root, kid, kid + 1, *grandkids]
    assert store.subtree_ids(other) == [other]
    assert store.ancestor_ids(grandkids[0]) == [kid, root]
    assert store.ancestor_ids(root) == []


def test_newest_named_per_parent(store: Store) -> None:
    parent = _add(store)
    _add(store, name="x")
    top = _add(store, name="x")
    child = _add(store, name="x", parent_id=parent)
    assert _present(store.newest_named(None, "x")).id == top
    assert _present(store.newest_named(parent, "x")).id == child
    assert store.newest_named(parent, "y") is None


def test_idempotency_and_retry_keys(store: Store) -> None:
    task_id = _add(store)
    assert store.by_idempotency_key("k1") is None and store.retry_key(task_id) is None
    store.set_idempotency_key(task_id, "k1")
    store.set_retry_key(task_id, "r1")
    assert _present(store.by_idempotency_key("k1")).id == task_id
    assert store.retry_key(task_id) == "r1"
    assert store.retry_key(999) is None


def test_attempts_are_replaced_per_number(store: Store) -> None:
    task = store.get(_add(store))
    assert task is not None
    task.attempt, task.started_at, task.finished_at, task.exit_code = 0, 1.0, 2.0, 3
    task.reason = Reason.EXIT
    store.record_attempt(task)
    task.exit_code = 4
    store.record_attempt(task)
    task.attempt, task.exit_code, task.reason, task.signal = 1, None, Reason.SIGNAL, 9
    store.record_attempt(task)
    assert store.attempts(task.id) == [
        {"attempt": 0, "started_at": 1.0, "finished_at": 2.0, "exit_code": 4, "signal": None,
         "reason": "exit"},
        {"attempt": 1, "started_at": 1.0, "finished_at": 2.0, "exit_code": None, "signal": 9,
         "reason": "signal"},
    ]


def test_an_attempt_s_start_and_cpu_totals_are_kept_with_its_exit(store: Store) -> None:
    task = store.get(_add(store))
    assert task is not None
    task.attempt, task.started_at = 1, 5.0
    store.record_attempt(task)  # at its start: no totals yet
    record = store.attempt_record(task.id, 1)
    assert record is not None and (record.started_at, record.cpu) == (5.0, None)
    task.finished_at, task.exit_code = 6.0, 0
    store.record_attempt(task, (0.25, 0.125))
    record = store.attempt_record(task.id, 1)
    assert record is not None and (record.started_at, record.cpu) == (5.0, (0.25, 0.125))
    assert store.attempt_record(task.id, 2) is None


def test_a_store_made_before_cpu_totals_gains_their_columns(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "velda.db")
    old.execute("CREATE TABLE attempts (task_id INTEGER NOT NULL, attempt INTEGER NOT NULL, "
                "started_at REAL, finished_at REAL, exit_code INTEGER, signal INTEGER, "
                "reason TEXT, PRIMARY KEY (task_id, attempt))")
    old.execute("INSERT INTO attempts VALUES (7, 1, 1.0, 2.0, 0, NULL, NULL)")
    old.commit()
    old.close()
    store = SqliteStore(tmp_path / "velda.db")
    record = store.attempt_record(7, 1)  # an attempt it had keeps what it had
    assert record is not None and (record.started_at, record.cpu) == (1.0, None)
    task = store.get(_add(store))
    assert task is not None
    task.attempt, task.started_at = 1, 3.0
    with store.transaction():
        store.record_attempt(task, (1.5, 0.5))
    record = store.attempt_record(task.id, 1)
    assert record is not None and record.cpu == (1.5, 0.5)
    store.close()


def test_open_tasks_oldest_first(store: Store) -> None:
    a = _add(store, status=TaskStatus.RUNNING)
    _add(store, status=TaskStatus.CANCELLED)
    c = _add(store)
    assert [t.id for t in store.open_tasks()] == [a, c]


def _query(store: Store, **given: object) -> list[int]:
    args: dict[str, object] = {
        "parent_id": None, "top_level": False, "statuses": [], "labels": [], "text": None,
        "after": None, "limit": 100,
    }
    args.update(given)
    return [t.id for t in store.query(**args)]  # type: ignore[arg-type]


def test_query_filters_order_and_pages(store: Store) -> None:
    a = _add(store, name="Train-big", labels={"team": "ml", "env": "prod"})
    b = _add(store, command=["python", "eval.py"], labels={"team": "ml"}, status=TaskStatus.FAILURE)
    kids = [_add(store, parent_id=a) for _ in range(3)]
    assert _query(store) == [*kids[::-1], b, a]
    assert _query(store, top_level=True) == [b, a]
    assert _query(store, parent_id=a) == kids
    assert _query(store, parent_id=a, after=kids[0], limit=1) == [kids[1]]
    assert _query(store, top_level=True, after=b) == [a]
    assert _query(store, limit=2) == kids[:0:-1]
    assert _query(store, statuses=["FAILURE", "SUCCESS"]) == [b]
    assert _query(store, labels=[("team", "ml")]) == [b, a]
    assert _query(store, labels=[("team", "ml"), ("env", "prod")]) == [a]
    assert _query(store, labels=[("team", "web")]) == []
    assert _query(store, text="train") == [a]
    assert _query(store, text="EVAL") == [b]


def test_a_raising_transaction_changes_nothing(store: Store) -> None:
    kept = _add(store)
    with pytest.raises(RuntimeError), store.transaction():
        with store.transaction():
            gone = _add(store, name="gone")
            store.add_dependencies(gone, [Dependency(kept, DependencyKind.ANY)])
            store.set_idempotency_key(gone, "k")
        task = store.get(kept)
        assert task is not None
        task.status = TaskStatus.SUCCESS
        store.update(task, "status")
        raise RuntimeError("boom")
    assert _get(store, kept).status == TaskStatus.PENDING
    assert store.get(gone) is None and store.by_idempotency_key("k") is None
    assert store.dependents(kept) == []
    assert store.last_id() == kept


def test_a_nested_transaction_joins_the_outer_one(store: Store) -> None:
    with store.transaction():
        first = _add(store)
        with pytest.raises(RuntimeError), store.transaction():
            second = _add(store)
            raise RuntimeError("caught by the outer block")
    assert [t.id for t in store.get_many([first, second])] == [first, second]


def test_counts_by_status_and_pool(store: Store) -> None:
    _add(store, pool="cpu", status=TaskStatus.RUNNING)
    _add(store, pool="cpu", status=TaskStatus.RUNNING)
    _add(store, pool="gpu", status=TaskStatus.QUEUED)
    assert store.status_counts() == {"RUNNING": 2, "QUEUED": 1}
    assert store.pool_counts() == {"cpu": {"RUNNING": 2}, "gpu": {"QUEUED": 1}}


def test_changes_name_the_tasks_whose_rows_were_written(store: Store) -> None:
    waiting, queued, running, other = (_add(store) for _ in range(4))
    store.changes.take()  # new tasks are no change of a row anyone follows
    store.update(_get(store, running), "status")
    assert store.changes.take() == {running}
    assert store.changes.take() == set()  # taken once
    store.queue_pending([queued])
    store.request_cancel([other])
    assert store.changes.take() == {queued, other}
    store.cancel_waiting([waiting, queued], now=1.0)
    assert store.changes.take() == {waiting, queued}


def test_dependency_states_name_each_kind_and_upstream_status_once(store: Store) -> None:
    done = [_add(store, status=TaskStatus.SUCCESS) for _ in range(3)]
    running, failed = _add(store, status=TaskStatus.RUNNING), _add(store, status=TaskStatus.FAILURE)
    waiting = _add(store)
    store.add_dependencies(waiting, [
        *(Dependency(t, DependencyKind.SUCCESS) for t in done),
        Dependency(running, DependencyKind.SUCCESS), Dependency(failed, DependencyKind.FAIL),
        Dependency(failed + 100, DependencyKind.ANY),  # an upstream no longer stored
    ])
    assert store.dependency_states(waiting) == {
        (DependencyKind.SUCCESS, TaskStatus.SUCCESS), (DependencyKind.SUCCESS, TaskStatus.RUNNING),
        (DependencyKind.FAIL, TaskStatus.FAILURE), (DependencyKind.ANY, None),
    }
    assert store.dependency_states(done[0]) == set()
