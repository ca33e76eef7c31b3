"""The server's own work with many tasks running, on an engine that starts nothing.

`bench/budgets.py` section 7: a real Runtime and SQLite store in a temporary directory, with a
synthetic local engine whose attempts "run" as soon as they start and never end. N tasks are
submitted and started; then, with N running, one scheduling pass that starts one more task,
and submits, are timed against the same with nothing running. No processes, no HTTP: what the
lifecycle itself costs as the number of running tasks grows. Then the same pass with N tasks
queued behind a pool that runs one at a time (`capacity = 1`, its slot taken) while the
machine has CPUs free for the task the pass starts.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from velda.config import Config
from velda.engines.base import EngineEvents, Handle, Launch, StartResult, start_each
from velda.models import Pool, Resources
from velda.protocol import SubmitRequest
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore


class SyntheticEngine:
    """A local engine whose attempts run at once and run forever, at no cost."""

    name, places_work, writes_log_index = "local", False, True
    samples_here, gives_terminals = False, False

    def __init__(self, events: EngineEvents, cpus: float) -> None:
        self.events, self.cpus = events, cpus

    def capacity(self) -> Resources:
        return Resources(self.cpus, 0)

    async def check(self, pool: Pool) -> None:
        return None

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        return None

    async def inventory(self, pool: Pool) -> None:
        return None

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        return await start_each(self, launches)

    async def start(self, launch: Launch) -> Handle:
        handle = {"synthetic": True}
        self.events.running(launch.task_id, launch.attempt, handle)
        return handle

    async def signal(self, handle: Handle, signum: int) -> None:
        return None

    def host_of(self, handle: Handle) -> str:
        return "127.0.0.1"

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        return None

    async def terminal(self, handle: Handle, data: bytes, size: tuple[int, int] | None) -> None:
        return None

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        return None

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        return None

    async def close(self) -> None:
        return None


ONE_AT_A_TIME = Pool("one", "local", Resources(cpus=1), capacity=1)


def _request(i: int, pool: str | None = None) -> SubmitRequest:
    return SubmitRequest(command=["true"], name=f"t{i}", cwd="/", env={"PATH": "/bin"},
                         pool=pool)


async def _fill(runtime: Runtime, n: int, step: int = 1000, pool: str | None = None) -> None:
    for start in range(0, n, step):
        await runtime.submit_many(
            [_request(i, pool) for i in range(start, min(n, start + step))], None)
        await runtime.schedule_once()
        runtime.settle()


async def _timed_pass(runtime: Runtime) -> tuple[float, float]:
    """Seconds to submit one task (of the default pool), and of the scheduling pass that
    starts it."""
    started = time.perf_counter()
    await runtime.submit(_request(-1), None)
    submitted = time.perf_counter()
    await runtime.schedule_once()
    runtime.settle()
    return submitted - started, time.perf_counter() - submitted


async def measure(root: Path, running: int, samples: int = 50) -> dict[str, float]:
    """Median submit and scheduling pass with nothing running, then with `running` running."""
    runtime = Runtime(root, Config(), SqliteStore(root / "velda.db"), lambda i: f"t{i}",
                      local=lambda events: SyntheticEngine(events, running + 2 * samples + 10))
    idle = [await _timed_pass(runtime) for _ in range(samples)]
    await _fill(runtime, running)
    busy = [await _timed_pass(runtime) for _ in range(samples)]
    counts = runtime.store.status_counts()
    await runtime.close()
    return {
        "submit_idle": statistics.median(s for s, _ in idle),
        "pass_idle": statistics.median(p for _, p in idle),
        "submit_busy": statistics.median(s for s, _ in busy),
        "pass_busy": statistics.median(p for _, p in busy),
        "running": float(counts.get("RUNNING", 0)),
    }


async def measure_backlog(root: Path, queued: int, samples: int = 50) -> dict[str, float]:
    """Median scheduling pass with `queued` tasks waiting for the one slot of a pool, the
    machine's CPUs free for others, and how many of them still wait."""
    runtime = Runtime(root, Config(pools={ONE_AT_A_TIME.name: ONE_AT_A_TIME}),
                      SqliteStore(root / "velda.db"), lambda i: f"t{i}",
                      local=lambda events: SyntheticEngine(events, 2 * samples + 10))
    await _fill(runtime, queued + 1, pool=ONE_AT_A_TIME.name)
    passes = [(await _timed_pass(runtime))[1] for _ in range(samples)]
    counts = runtime.store.status_counts()
    await runtime.close()
    return {"pass_backlog": statistics.median(passes), "queued": float(counts.get("QUEUED", 0))}


def run(root: Path, running: int) -> dict[str, float]:
    for part in ("running", "backlog"):
        (root / part).mkdir(mode=0o700)
    measured = asyncio.run(measure(root / "running", running))
    return {**measured, **asyncio.run(measure_backlog(root / "backlog", running))}
