"""start_now: a coroutine runs at once up to its first wait, the rest as a task."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from velda.server.eager import start_now


class Tasks:
    """`later` for start_now: keeps the tasks it makes."""

    def __init__(self) -> None:
        self.made: list[asyncio.Task[None]] = []

    def __call__(self, job: Coroutine[Any, Any, None]) -> None:
        self.made.append(asyncio.get_running_loop().create_task(job))


def test_a_job_that_never_waits_is_done_when_start_now_returns() -> None:
    steps: list[str] = []

    async def job() -> None:
        steps.append("ran")

    async def main() -> None:
        tasks = Tasks()
        start_now(job(), tasks)
        assert steps == ["ran"]
        assert tasks.made == []

    asyncio.run(main())


def test_a_job_runs_to_its_first_wait_at_once_and_on_as_a_task() -> None:
    steps: list[str] = []

    async def job(gate: asyncio.Future[str]) -> None:
        steps.append("before")
        steps.append(await gate)
        await asyncio.sleep(0)
        steps.append("after")

    async def main() -> None:
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        tasks = Tasks()
        start_now(job(gate), tasks)
        assert steps == ["before"]
        gate.set_result("opened")
        await asyncio.gather(*tasks.made)
        assert steps == ["before", "opened", "after"]

    asyncio.run(main())


def test_an_error_after_the_first_wait_is_the_tasks() -> None:
    async def job() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    async def main() -> None:
        tasks = Tasks()
        start_now(job(), tasks)
        with pytest.raises(ValueError, match="late"):
            await tasks.made[0]

    asyncio.run(main())


def test_a_cancel_of_the_task_reaches_the_job() -> None:
    seen: list[str] = []

    async def job() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        tasks = Tasks()
        start_now(job(), tasks)
        await asyncio.sleep(0)
        tasks.made[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await tasks.made[0]
        assert seen == ["cancelled"]

    asyncio.run(main())


def test_an_error_before_the_first_wait_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def job() -> None:
        raise ValueError("early")

    async def main() -> None:
        tasks = Tasks()
        start_now(job(), tasks)
        assert tasks.made == []

    asyncio.run(main())
    assert "early" in caplog.text
