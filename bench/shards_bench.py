"""A big shard set: how long `vbatch -N 10000 sleep 30` takes to submit and `velda task cancel`
to cancel, and the worst /healthz latency while each happens.

Starts a private server (a temporary VELDA_HOME, VELDA_PORT=0), stops it at the end and kills
what its tasks leave; then the same submit and cancel on a Runtime in this process, timing the
longest stall of its event loop, which the CLI processes' own CPU does not blur on a small
machine. Progress goes to stderr, one Markdown table to stdout:

    python bench/shards_bench.py [--shards 10000] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
VELDA, VBATCH = str(BIN / "velda"), str(BIN / "vbatch")


class HealthProbe:
    """Asks /healthz every 10 ms on its own thread; remembers the slowest answer."""

    def __init__(self, url: str) -> None:
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.worst, self.count = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.conn.request("GET", "/healthz")
            self.conn.getresponse().read()
            self.worst = max(self.worst, time.perf_counter() - start)
            self.count += 1
            self._stop.wait(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()


def run(env: dict[str, str], *argv: str) -> str:
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"{argv[:3]} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout.strip()


def timed(probe_url: str, env: dict[str, str], *argv: str) -> tuple[float, float, str]:
    with HealthProbe(probe_url) as probe:
        start = time.perf_counter()
        out = run(env, *argv)
        wall = time.perf_counter() - start
        time.sleep(0.2)  # work the server does after it answered
    return wall, probe.worst, out


def counts(env: dict[str, str], task_id: str) -> dict[str, Any]:
    task = json.loads(run(env, VELDA, "task", "get", task_id, "-o", "json"))
    return {"status": task["status"], **task["children"]}


def idle(url: str, seconds: float = 2.0) -> tuple[str, str, str]:
    """The same probe with nothing else asked of the server: this machine's noise floor."""
    with HealthProbe(url) as probe:
        time.sleep(seconds)
    return ("idle server (baseline)", f"{seconds:.2f} s", f"{probe.worst * 1000:.0f} ms")


def one_run(shards: int, env: dict[str, str], url: str) -> list[tuple[str, str, str]]:
    baseline = idle(url)
    print(f"submitting {shards} shards ...", file=sys.stderr)
    submit_s, submit_worst, task_id = timed(url, env, VBATCH, "-N", str(shards), "sleep", "30")
    time.sleep(1)
    print(f"cancelling task {task_id} ...", file=sys.stderr)
    cancel_s, cancel_worst, _ = timed(url, env, VELDA, "task", "cancel", task_id)
    with HealthProbe(url) as probe:
        start = time.perf_counter()
        list_out = run(env, VELDA, "task", "list", task_id, "--max-results", "1000")
        list_s = time.perf_counter() - start
    after = counts(env, task_id)
    print(f"after cancel: {after}", file=sys.stderr)
    return [
        baseline,
        (f"submit -N {shards}", f"{submit_s:.2f} s", f"{submit_worst * 1000:.0f} ms"),
        ("cancel", f"{cancel_s:.2f} s", f"{cancel_worst * 1000:.0f} ms"),
        (f"list 1000 of its {len(list_out.splitlines()) - 1} shown", f"{list_s:.2f} s",
         f"{probe.worst * 1000:.0f} ms"),
        ("parent after cancel", after["status"], f"{after['total']} shards"),
    ]


async def _in_process(shards: int) -> list[tuple[str, str, str]]:
    """The same steps on a Runtime in this process, with a 1 ms ticker on its event loop: the
    longest time the loop was not free (the last column), without the CLI processes' CPU."""
    from velda.config import Config
    from velda.protocol import SubmitRequest
    from velda.server.runtime import Runtime
    from velda.store.sqlite import SqliteStore

    with tempfile.TemporaryDirectory(prefix="velda-shards-") as home:
        runtime = Runtime(Path(home), Config(), SqliteStore(Path(home) / "velda.db"), str)
        worst = [0.0]

        async def tick() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                worst[0], last = max(worst[0], now - last), now

        ticker = asyncio.create_task(tick())
        request = SubmitRequest.from_json(
            {"command": ["sleep", "30"], "total_shards": shards, "env": dict(os.environ)}
        )

        async def measured(name: str, step: Awaitable[Any]) -> tuple[Any, tuple[str, str, str]]:
            await asyncio.sleep(0.1)
            worst[0], start = 0.0, time.perf_counter()
            result = await step
            wall = time.perf_counter() - start
            await asyncio.sleep(0.5)  # the shards are queued after the answer
            return result, (f"in-process {name}", f"{wall:.2f} s", f"{worst[0] * 1000:.0f} ms")

        task, submitted = await measured("submit", runtime.submit(request, None))
        _, cancelled = await measured("cancel", runtime.cancel(task.id))
        rows = [submitted, cancelled]
        ticker.cancel()
        await runtime.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="velda-shards-") as root:
        home = Path(root) / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VELDA_")}
        env.update(VELDA_HOME=str(home), VELDA_PORT="0")
        run(env, VELDA, "server", "start")
        url = json.loads((home / "server.json").read_text())["url"]
        try:
            rows = [row for _ in range(args.runs) for row in one_run(args.shards, env, url)]
        finally:
            run(env, VELDA, "server", "stop")
            for pid_file in (home / "logs").glob("*/pid"):
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
    rows += asyncio.run(_in_process(args.shards))
    print("| step | wall time | worst /healthz meanwhile (in-process: longest loop stall) |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
