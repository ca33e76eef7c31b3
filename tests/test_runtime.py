"""The task lifecycle in memory: a store in RAM, a fake engine, an explicit clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from velda.config import Config
from velda.engines.base import EngineEvents, Handle, Launch, StartResult, start_each
from velda.models import Exit, Pool, Resources, TaskStatus
from velda.protocol import BadRequest, SubmitRequest
from velda.server.bursts import SubmitBursts
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore

S = TaskStatus


class FakeEngine:
    """Starts nothing; the test ends attempts by hand."""

    name, places_work, writes_log_index = "local", False, True
    samples_here = False

    def host_of(self, handle: Handle) -> str:
        return "127.0.0.1"
    gives_terminals = False

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        return None

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        return await start_each(self, launches)

    def __init__(self, runtime: Runtime, cpus: float) -> None:
        self.runtime, self._cpus = runtime, cpus
        self.started: list[Launch] = []

    def capacity(self) -> Resources:
        return Resources(self._cpus, 0)

    async def check(self, pool: Pool) -> None:
        return None

    async def start(self, launch: Launch) -> Handle:
        self.started.append(launch)
        self.runtime.running(launch.task_id, launch.attempt, {"fake": True})
        return {"fake": True}

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        return None

    async def close(self) -> None:
        return None

    def finish(self, task_id: int, code: int) -> None:
        task = self.runtime.store.get(task_id)
        assert task is not None
        self.runtime.exited(str(task_id), task.attempt, Exit.from_code(code))


def runtime_with(tmp_path: Path, cpus: int = 1,
                 config: Config | None = None) -> tuple[Runtime, FakeEngine]:
    """A runtime on an in-memory store whose local engine is a FakeEngine of `cpus` CPUs."""
    engines: list[FakeEngine] = []

    def make(events: EngineEvents) -> FakeEngine:
        assert isinstance(events, Runtime)  # the runtime hears its engines itself
        engines.append(FakeEngine(events, cpus=cpus))
        return engines[0]

    runtime = Runtime(tmp_path, config or Config(), SqliteStore(":memory:"),
                      lambda i: f"t{i}", now=lambda: 1000.0, local=make)
    return runtime, engines[0]


@pytest.fixture
def world(tmp_path: Path) -> tuple[Runtime, FakeEngine]:
    return runtime_with(tmp_path)


def submit(runtime: Runtime, **fields: object) -> int:
    body = {"command": ["x"], "cwd": "/", **fields}
    task = asyncio.get_event_loop().run_until_complete(
        runtime.submit(SubmitRequest.from_json(body), None)
    )
    return task.id


def settle(runtime: Runtime) -> None:
    loop = asyncio.get_event_loop()
    for _ in range(3):
        loop.run_until_complete(runtime.schedule_once())


def status(runtime: Runtime, task_id: int) -> S:
    task = runtime.store.get(task_id)
    assert task is not None
    return task.status


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> object:
    """Each test on asyncio's own loop and on uvloop, which the server runs on."""
    if request.param == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def test_a_long_failed_chain_resolves_at_once_without_recursion(world: tuple) -> None:
    runtime, engine = world
    first = submit(runtime, name="s0")
    ids = [first] + [
        submit(runtime, name=f"s{i}", after_success=[f"s{i - 1}"]) for i in range(1, 1500)
    ]
    settle(runtime)
    engine.finish(first, 1)
    assert status(runtime, ids[-1]) == S.FAILED_UPSTREAM
    assert all(status(runtime, i) == S.FAILED_UPSTREAM for i in ids[1:])


def test_one_cpu_runs_tasks_one_by_one_in_priority_order(world: tuple) -> None:
    runtime, engine = world
    blocker = submit(runtime)
    settle(runtime)
    low, high, mid = submit(runtime, priority=5), submit(runtime, priority=-1), submit(runtime)
    settle(runtime)
    order = []
    for _ in range(4):
        running = [t for t in (blocker, low, high, mid) if status(runtime, t) == S.RUNNING]
        assert len(running) == 1
        order.append(running[0])
        engine.finish(running[0], 0)
        settle(runtime)
    assert order == [blocker, high, mid, low]


def test_retries_requeue_with_the_next_attempt(world: tuple) -> None:
    runtime, engine = world
    task_id = submit(runtime, retries=2)
    for attempt in (1, 2):
        settle(runtime)
        assert runtime.store.get(task_id).attempt == attempt  # type: ignore[union-attr]
        engine.finish(task_id, 1)
        assert status(runtime, task_id) == S.QUEUED
    settle(runtime)
    engine.finish(task_id, 0)
    assert status(runtime, task_id) == S.SUCCESS
    assert [a["exit_code"] for a in runtime.store.attempts(task_id)] == [1, 1, 0]


def test_a_final_state_never_changes_but_by_retry(world: tuple) -> None:
    runtime, engine = world
    task_id = submit(runtime)
    settle(runtime)
    engine.finish(task_id, 3)
    assert status(runtime, task_id) == S.FAILURE
    engine.finish(task_id, 0)  # a late or repeated report changes nothing
    assert status(runtime, task_id) == S.FAILURE
    asyncio.get_event_loop().run_until_complete(runtime.retry(task_id))
    settle(runtime)
    assert status(runtime, task_id) == S.RUNNING
    engine.finish(task_id, 0)
    assert status(runtime, task_id) == S.SUCCESS
    with pytest.raises(BadRequest, match="succeeded; nothing to retry"):
        asyncio.get_event_loop().run_until_complete(runtime.retry(task_id))


def test_a_pool_server_url_is_the_velda_server_its_tasks_see(tmp_path: Path) -> None:
    pools = {"far": Pool("far", "local", Resources(cpus=1), {"server_url": "http://head:7411"})}
    config = Config(pools=pools, server_url="http://team:7411")
    runtime, engine = runtime_with(tmp_path, cpus=2, config=config)
    submit(runtime, pool="far")
    submit(runtime, pool="cpu-1")
    settle(runtime)
    seen = {launch.pool.name: launch.env["VELDA_SERVER"] for launch in engine.started}
    assert seen == {"far": "http://head:7411", "cpu-1": "http://team:7411"}


def _finish_in_one_tick(runtime: Runtime, engine: FakeEngine, ids: list[int]) -> list[str]:
    """End the attempts of `ids` in one turn of the event loop; the statements that wrote
    their reports."""
    statements: list[str] = []
    runtime.store.db.set_trace_callback(statements.append)  # type: ignore[attr-defined]

    async def finish_all() -> None:
        for task_id in ids:
            engine.finish(task_id, 0)
        await asyncio.sleep(0)  # the end of the tick: the group is written
        await asyncio.sleep(0)  # a pass that comes on its own (not joined to them) begins
        others = asyncio.all_tasks() - {asyncio.current_task()}
        await asyncio.gather(*others)

    asyncio.get_event_loop().run_until_complete(finish_all())
    runtime.store.db.set_trace_callback(None)  # type: ignore[attr-defined]
    return statements


def test_the_exits_of_one_tick_are_written_in_one_transaction(tmp_path: Path) -> None:
    runtime, engine = runtime_with(tmp_path, cpus=20)
    ids = [submit(runtime) for _ in range(20)]
    settle(runtime)
    assert {status(runtime, i) for i in ids} == {S.RUNNING}
    statements = _finish_in_one_tick(runtime, engine, ids)
    assert [s for s in statements if s.startswith("BEGIN")] == ["BEGIN IMMEDIATE"]
    assert {status(runtime, i) for i in ids} == {S.SUCCESS}


def test_a_report_that_cannot_be_written_leaves_the_others_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, engine = runtime_with(tmp_path, cpus=3)
    ids = [submit(runtime) for _ in range(3)]
    settle(runtime)
    record_exit = runtime._record_exit

    def broken_for_the_second(task: object, exit: Exit) -> tuple[str, ...]:
        if getattr(task, "id", None) == ids[1]:
            raise RuntimeError("broken")
        return record_exit(task, exit)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "_record_exit", broken_for_the_second)
    _finish_in_one_tick(runtime, engine, ids)
    assert [status(runtime, i) for i in ids] == [S.SUCCESS, S.RUNNING, S.SUCCESS]
    assert f"('exit', '{ids[1]}', 1) could not be written" in caplog.text


def _transactions(statements: list[str]) -> list[list[str]]:
    """The statements of each transaction, BEGIN to COMMIT."""
    found: list[list[str]] = []
    for statement in statements:
        if statement.startswith("BEGIN"):
            found.append([])
        elif found and not statement.startswith("COMMIT"):
            found[-1].append(statement)
    return found


def test_an_exit_and_the_start_it_makes_room_for_are_one_commit(tmp_path: Path) -> None:
    runtime, engine = runtime_with(tmp_path, cpus=1)
    first, second = submit(runtime), submit(runtime)
    settle(runtime)
    assert _started(engine) == [first]
    statements = _finish_in_one_tick(runtime, engine, [first])
    ends = [t for t in _transactions(statements) if any("'SUCCESS'" in s for s in t)]
    assert len(ends) == 1
    assert any("INTO attempts" in s and f"VALUES ({second}, 1," in s for s in ends[0])
    assert (status(runtime, first), status(runtime, second)) == (S.SUCCESS, S.RUNNING)
    assert _started(engine) == [first, second]


def test_the_start_joined_to_an_exit_is_handed_over_in_the_same_turn(tmp_path: Path) -> None:
    """No turn of the event loop between the commit and the engine's start: a local slot
    does not wait a turn for its next task."""
    runtime, engine = runtime_with(tmp_path, cpus=1)
    first, second = submit(runtime), submit(runtime)
    settle(runtime)

    async def end_the_first() -> None:
        engine.finish(first, 0)
        await asyncio.sleep(0)  # the end of this tick: the reports' group is written

    asyncio.get_event_loop().run_until_complete(end_the_first())
    assert _started(engine) == [first, second]


def test_a_pass_that_fails_in_the_reports_transaction_leaves_the_exit_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, engine = runtime_with(tmp_path, cpus=1)
    first, second = submit(runtime), submit(runtime)
    settle(runtime)
    new_attempts, failures = runtime._new_attempts, [RuntimeError("broken once")]

    def broken_once(*args: object) -> None:
        if failures:
            raise failures.pop()
        new_attempts(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "_new_attempts", broken_once)
    _finish_in_one_tick(runtime, engine, [first])
    assert "broken once" in caplog.text
    assert status(runtime, first) == S.SUCCESS  # the exit, written without the pass
    assert status(runtime, second) == S.RUNNING  # by the pass asked for, on its own
    assert _started(engine) == [first, second]


def _ticks(n: int = 5) -> None:
    """Let the loop run what is due now (a pass asked for at once), nothing later."""
    for _ in range(n):
        asyncio.get_event_loop().run_until_complete(asyncio.sleep(0))


def _started(engine: FakeEngine) -> list[int]:
    return [int(launch.task_id) for launch in engine.started]


def test_submits_one_after_another_start_at_once_and_a_burst_after_its_submits(
    tmp_path: Path,
) -> None:
    runtime, engine = runtime_with(tmp_path, cpus=16)
    clock = [100.0]
    runtime.bursts = SubmitBursts(window=0.05, count=3, clock=lambda: clock[0])
    paced = []
    for _ in range(4):  # a client that waits a little between its submits
        clock[0] += 0.03
        paced.append(submit(runtime))
        _ticks()
        assert _started(engine) == paced

    clock[0] += 1  # a pause, then five submits at once
    burst = [submit(runtime) for _ in range(5)]
    _ticks()
    assert _started(engine)[4:] == burst[:2]  # too few yet to tell a burst: at once
    assert {status(runtime, i) for i in burst[2:]} == {S.QUEUED}  # the others wait ...
    engine.finish(burst[0], 0)  # (an exit's report does not cut the wait short)
    _ticks()
    assert {status(runtime, i) for i in burst[2:]} == {S.QUEUED}
    asyncio.get_event_loop().run_until_complete(asyncio.sleep(0.1))
    assert {status(runtime, i) for i in burst[1:]} == {S.RUNNING}  # ... for one pass, together
    assert _started(engine)[6:] == burst[2:]

    clock[0] += 1  # the burst is over: a submit starts at once again
    after = submit(runtime)
    _ticks()
    assert _started(engine)[-1] == after
