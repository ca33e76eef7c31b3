"""What a store write costs: a transaction per engine report against one per group of reports
(group commit), under SQLite's three `synchronous` settings, on the store velda uses.

Each "report" is what the server writes when an attempt ends: the task's exit fields and
status, and its attempt row. Progress on stderr, one Markdown table on stdout:

    python bench/store_bench.py [--reports 4000] [--group 50]

What each setting guarantees in WAL mode (SQLite's documentation; velda uses NORMAL):
- OFF: no fsync at all; a power loss may corrupt the file. A process crash loses nothing.
- NORMAL: the WAL is synced at checkpoints only; a power loss may lose the last
  transactions, never the file. A process crash (kill -9) loses nothing committed.
- FULL: the WAL is synced at every commit; a power loss loses nothing committed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from velda.models import Reason, Task, TaskStatus
from velda.store.sqlite import SqliteStore


def filled_store(path: Path, count: int) -> tuple[SqliteStore, list[Task]]:
    store = SqliteStore(path)
    tasks = []
    with store.transaction():
        for i in range(count):
            task = Task(id=0, pool="shell", command=["true"], cwd="/", env={"PATH": "/bin"},
                        name=f"t{i}", labels={"pool": "shell"}, created_at=time.time(),
                        status=TaskStatus.RUNNING, started_at=time.time(), attempt=1)
            store.insert(task)
            tasks.append(task)
    return store, tasks


def report(store: SqliteStore, task: Task) -> None:
    """The writes of one attempt's exit (Runtime._record_exit and _finalize)."""
    task.exit_code, task.reason, task.finished_at = 0, Reason.EXIT, time.time()
    task.status, task.resolved_at = TaskStatus.SUCCESS, time.time()
    store.update(task, "exit_code", "reason", "finished_at", "status", "resolved_at")
    store.record_attempt(task)


def per_report_s(store: SqliteStore, tasks: list[Task], group: int) -> float:
    """Seconds per report, written `group` reports to a transaction."""
    started = time.perf_counter()
    for at in range(0, len(tasks), group):
        with store.transaction():
            for task in tasks[at : at + group]:
                report(store, task)
    return (time.perf_counter() - started) / len(tasks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reports", type=int, default=4000)
    p.add_argument("--group", type=int, default=50, help="reports per transaction, grouped")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("OFF", "NORMAL", "FULL"):
            cells = []
            for group in (1, args.group):
                path = Path(tmp) / f"{setting}-{group}.db"
                store, tasks = filled_store(path, args.reports)
                store.db.execute(f"PRAGMA synchronous={setting}")
                print(f"synchronous={setting}, {group} a transaction", file=sys.stderr)
                cells.append(per_report_s(store, tasks, group))
                store.close()
            rows.append((setting, *cells))
    print(f"| synchronous | µs per report, a transaction each | µs per report, {args.group} "
          "a transaction | ratio |")
    print("| --- | --- | --- | --- |")
    for setting, alone, grouped in rows:
        print(f"| {setting}{' (velda)' if setting == 'NORMAL' else ''} | {alone * 1e6:,.0f} | "
              f"{grouped * 1e6:,.0f} | {alone / grouped:.1f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
