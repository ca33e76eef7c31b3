"""Server time of the web UI's pages and of the API calls they make, with 100,000 tasks stored.

Fills a fresh VELDA_HOME's store directly (50,000 top-level tasks and 500 pipelines of 100
children each), starts a real server on it, and times each request on its own loopback
connection. Prints one table; the budget (SPEC §9) is 300 ms for the web task list.

    python bench/ui_bench.py [--tasks 100000] [--requests 50]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from velda.models import Task, TaskStatus
from velda.store.sqlite import SqliteStore

CHILDREN = 100


def fill(db: Path, total: int) -> tuple[int, int]:
    """Stores `total` tasks; returns a pipeline's ID and one of its children's."""
    store = SqliteStore(db)
    now = time.time() - total
    pipelines = total // 2 // (CHILDREN + 1)
    parent = child = 0
    with store.transaction():
        for i in range(total - pipelines * (CHILDREN + 1)):
            store.insert(finished(f"job-{i}", ["python", "train.py", str(i)], now + i, i % 17 == 0))
        for p in range(pipelines):
            parent = store.insert(finished(f"pipeline-{p}", ["bash", "pipeline.sh"], now, False))
            for c in range(CHILDREN):
                task = finished(f"data/{c}.csv", ["python", "process.py", str(c)], now, c == 7)
                task.parent_id = parent
                child = store.insert(task)
    store.close()
    return parent, child


def finished(name: str, command: list[str], at: float, failed: bool) -> Task:
    return Task(
        id=0,
        pool="shell",
        command=command,
        cwd="/work",
        env={"HOME": "/root", "API_TOKEN": "x"},
        status=TaskStatus.FAILURE if failed else TaskStatus.SUCCESS,
        name=name,
        labels={"pool": "shell", "team": "ml"},
        attempt=1,
        exit_code=1 if failed else 0,
        created_at=at,
        started_at=at + 0.01,
        finished_at=at + 1.0,
        resolved_at=at + 1.0,
    )


def timings(address: tuple[str, int], path: str, token: str, n: int) -> list[float]:
    """Milliseconds per request, each on a new connection (loopback connect is ~0.1 ms)."""
    out = []
    for i in range(n + 3):
        start = time.perf_counter()
        conn = http.client.HTTPConnection(*address)
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.status != 200:
            raise SystemExit(f"GET {path}: {response.status}")
        if i >= 3:  # the first requests warm caches
            out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100_000)
    p.add_argument("--requests", type=int, default=50)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="velda-ui-bench-") as tmp:
        home = Path(tmp)
        started = time.perf_counter()
        parent, child = fill(home / "velda.db", args.tasks)
        print(f"stored {args.tasks:,} tasks in {time.perf_counter() - started:.1f} s")
        env = {**os.environ, "VELDA_HOME": tmp, "VELDA_PORT": "0"}
        for name in ("VELDA_SERVER", "VELDA_TOKEN"):
            env.pop(name, None)
        subprocess.run(["velda", "server", "start"], env=env, check=True, capture_output=True)
        try:
            status = subprocess.run(
                ["velda", "server", "status", "-o", "json"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            url = urlsplit(json.loads(status.stdout)["url"])
            token = (home / "token").read_text().strip()
            address = (url.hostname or "127.0.0.1", url.port or 80)
            report(address, token, parent, child, args.requests)
        finally:
            subprocess.run(["velda", "server", "stop"], env=env, capture_output=True)


def report(address: tuple[str, int], token: str, parent: int, child: int, n: int) -> None:
    calls = [
        ("page /", "/"),
        (f"page /tasks/{parent}", f"/tasks/{parent}"),
        ("page /pools", "/pools"),
        ("static app.js", "/static/app.js"),
        ("API list, first page", "/api/v1/tasks?page_size=50"),
        ("API list, a later page", f"/api/v1/tasks?page_size=50&page_token={child}"),
        ("API list, status=FAILURE", "/api/v1/tasks?page_size=50&status=FAILURE"),
        ("API list, label team=ml", "/api/v1/tasks?page_size=50&label=team%3Dml"),
        ("API list, q=job-123", "/api/v1/tasks?page_size=50&q=job-123"),
        ("API children of a pipeline", f"/api/v1/tasks?page_size=50&parent={parent}"),
        ("API one task", f"/api/v1/tasks/{parent}"),
        ("API pools", "/api/v1/pools"),
    ]
    print(f"{'request':<30} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for label, path in calls:
        ms = sorted(timings(address, path, token, n))
        p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
        print(f"{label:<30} {statistics.median(ms):>10.2f} {p95:>8.2f} {ms[-1]:>8.2f}")


if __name__ == "__main__":
    main()
