"""`--timeout` counts from the moment an attempt really starts, afresh for each attempt; that
moment is the one its engine reports, when it knows it, kept within what the server saw.

Driven through the Runtime with an engine that places work itself and keeps each attempt in
its queue for a while first, as a busy cluster does (the engine is what these tests are not
about; Ray and Slurm are tested against real clusters elsewhere).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from velda.config import Config
from velda.engines.base import EngineEvents, Handle, Launch, StartResult, start_each
from velda.models import Exit, Pool, Reason, Resources, TaskStatus
from velda.protocol import SubmitRequest
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore

S = TaskStatus
QUEUE_S = 1.0  # how long each attempt waits in the cluster's queue


class QueueingEngine:
    """Runs `sleep-then-exit SECONDS CODE_OF_ATTEMPT_1 CODE_LATER` after QUEUE_S in a queue."""

    name, places_work, writes_log_index = "queueing", True, True
    samples_here = False

    def host_of(self, handle: Handle) -> str:
        return "127.0.0.1"
    gives_terminals = False

    def __init__(self, pool: Pool, events: EngineEvents) -> None:
        self.events = events
        self.cancelled: list[str] = []

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        return None

    async def check(self, pool: Pool) -> None:
        return None

    def capacity(self) -> Resources:
        return Resources()

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        return await start_each(self, launches)

    async def start(self, launch: Launch) -> Handle:
        handle: Handle = {"key": f"{launch.task_id}.{launch.attempt}"}
        loop = asyncio.get_running_loop()
        loop.call_later(QUEUE_S, self._run, launch, handle)
        return handle

    def _run(self, launch: Launch, handle: Handle) -> None:
        self.report_start(launch, handle)
        seconds, first, later = launch.argv
        code = int(first if launch.attempt == 1 else later)
        asyncio.get_running_loop().call_later(
            float(seconds), self._end, launch.task_id, launch.attempt, Exit.from_code(code)
        )

    def report_start(self, launch: Launch, handle: Handle) -> None:
        self.events.running(launch.task_id, launch.attempt, handle)

    def _end(self, task_id: str, attempt: int, exit: Exit) -> None:
        if f"{task_id}.{attempt}" not in self.cancelled:
            self.events.exited(task_id, attempt, exit)

    async def signal(self, handle: Handle, signum: int) -> None:
        return None

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        key = str(handle["key"])
        self.cancelled.append(key)
        task_id, attempt = key.split(".")
        self.events.exited(task_id, int(attempt), Exit.from_signal(15))

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        return None

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        return None

    async def close(self) -> None:
        return None


class NodeClockEngine(QueueingEngine):
    """Reports each start late, as a remote node's does, with the time the command started
    by the node's clock: LATE_S before the report, and OFF_S off the server's clock."""

    LATE_S = 0.3
    OFF_S = 0.0

    def report_start(self, launch: Launch, handle: Handle) -> None:
        spawned = time.time() - self.LATE_S + self.OFF_S
        self.events.running(launch.task_id, launch.attempt, handle, spawned)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    yield from _runtime(tmp_path, "QueueingEngine")


@pytest.fixture
def node_clock(tmp_path: Path) -> Iterator[Runtime]:
    yield from _runtime(tmp_path, "NodeClockEngine")


def _runtime(tmp_path: Path, engine: str) -> Iterator[Runtime]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    config = Config(pools={"cluster": Pool("cluster", "queueing", Resources(cpus=1))})
    registry = {"queueing": f"{__name__}:{engine}"}
    yield Runtime(tmp_path, config, SqliteStore(tmp_path / "velda.db"), str, registry=registry)
    loop.close()
    asyncio.set_event_loop(None)


def run_to_the_end(runtime: Runtime, argv: list[str], **fields: object) -> int:
    body = {"command": argv, "cwd": "/", "pool": "cluster", **fields}

    async def go() -> int:
        task = await runtime.submit(SubmitRequest.from_json(body), None)
        for _ in range(400):
            now = runtime.store.get(task.id)
            if now is not None and now.status.is_final():
                return task.id
            await asyncio.sleep(0.025)
        raise AssertionError(f"task {task.id} did not end")

    return asyncio.get_event_loop().run_until_complete(go())


def test_time_in_the_clusters_queue_does_not_count(runtime: Runtime) -> None:
    # queued 1 s, runs 0.8 s: within a 1.5 s timeout, though 1.8 s after the hand-over
    task_id = run_to_the_end(runtime, ["0.8", "0", "0"], timeout_s=1.5)
    task = runtime.store.get(task_id)
    assert task is not None
    assert (task.status, task.reason, task.exit_code) == (S.SUCCESS, None, 0)


def test_each_attempt_gets_the_whole_timeout_again(runtime: Runtime) -> None:
    # attempt 1 fails after 0.8 s; attempt 2 waits 1 s in the queue and runs 0.8 s: it ends
    # 2.6 s after attempt 1 started, and well within its own 1.5 s
    task_id = run_to_the_end(runtime, ["0.8", "1", "0"], timeout_s=1.5, retries=1)
    task = runtime.store.get(task_id)
    assert task is not None
    assert (task.status, task.attempt, task.reason) == (S.SUCCESS, 2, None)


def test_an_attempt_that_runs_too_long_is_stopped_as_timed_out(runtime: Runtime) -> None:
    task_id = run_to_the_end(runtime, ["30", "0", "0"], timeout_s=0.5)
    task = runtime.store.get(task_id)
    assert task is not None
    assert (task.status, task.reason, task.stop_cause) == (S.FAILURE, Reason.TIMEOUT,
                                                           Reason.TIMEOUT)
    assert task.started_at is not None and task.finished_at is not None
    assert 0.5 <= task.finished_at - task.started_at < 30  # stopped, not run to its end


def test_an_attempt_starts_when_its_engine_says_it_started(node_clock: Runtime) -> None:
    task_id = run_to_the_end(node_clock, ["0.5", "0", "0"])
    task = node_clock.store.get(task_id)
    assert task is not None and task.started_at is not None and task.finished_at is not None
    ran = task.finished_at - task.started_at  # 0.5 s, and the LATE_S before the report
    assert 0.5 + NodeClockEngine.LATE_S <= ran < 0.5 + NodeClockEngine.LATE_S + 0.25


@pytest.mark.parametrize("off_s", [-3600.0, 3600.0])
def test_a_start_by_a_clock_that_is_off_stays_within_what_the_server_saw(
    node_clock: Runtime, monkeypatch: pytest.MonkeyPatch, off_s: float
) -> None:
    monkeypatch.setattr(NodeClockEngine, "OFF_S", off_s)
    task_id = run_to_the_end(node_clock, ["0.5", "0", "0"])
    task = node_clock.store.get(task_id)
    assert task is not None and task.started_at is not None and task.finished_at is not None
    assert task.created_at <= task.started_at <= task.finished_at - 0.5
