"""Driving an engine directly, as the server does, for the engine tests.

A Harness owns an event loop, one engine and a Recorder of what the engine reports. The
contract suite (test_engine_contract.py) runs the same tests on every engine through it; each
engine's own tests (test_ray_engine.py, test_slurm_engine.py) use it for what only that engine
does.

    with local_harness() as h:
        launch = h.launch(tmp_path, ["sh", "-c", "exit 3"])
        assert h.run_to_end(launch) == Exit(3, None, Reason.EXIT)
        restarted = h.with_options()   # another engine on the same pool, as after a restart
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from velda.engines.base import Engine, EngineEvents, Handle, Launch
from velda.models import Exit, Pool, Resources

CPU = Resources(cpus=1)
BuildEngine = Callable[[Pool, EngineEvents], Engine]
_ids = itertools.count(1)


class Recorder:
    """An EngineEvents that checks the contract: on the loop thread, running at most once and
    before exited, exited exactly once."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.started: dict[tuple[str, int], Handle] = {}
        self.ended: dict[tuple[str, int], Exit] = {}
        self.errors: list[str] = []

    def running(self, task_id: str, attempt: int, handle: Handle,
                started_at: float | None = None) -> None:
        key = (task_id, attempt)
        self._check_thread()
        if key in self.started or key in self.ended:
            self.errors.append(f"running {key} after running or exited")
        self.started[key] = handle

    def exited(self, task_id: str, attempt: int, exit: Exit,
               written: Callable[[], None] | None = None) -> None:
        key = (task_id, attempt)
        self._check_thread()
        if key in self.ended:
            self.errors.append(f"exited {key} twice")
        self.ended[key] = exit
        if written is not None:  # kept, as a store would
            written()

    def _check_thread(self) -> None:
        if threading.get_ident() != self.loop_thread:
            self.errors.append("event called off the event loop thread")


class Harness:
    """One engine of kind `kind` on a pool with `options`, on `loop`."""

    def __init__(self, kind: str, build: BuildEngine, options: dict[str, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.kind = kind
        self.build = build
        self.options = options
        self.loop = loop
        self.events = Recorder()
        self.engine = build(self.pool(), self.events)

    def pool(self, resources: Resources = CPU, **options: Any) -> Pool:
        return Pool(self.kind, self.kind, resources, {**self.options, **options})

    def with_options(self, **options: Any) -> Harness:
        """Another engine on the same loop, with these pool options changed: as a server
        restarted after a crash makes it when none are given. Close it when done."""
        return Harness(self.kind, self.build, {**self.options, **options}, self.loop)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.engine.close())

    def launch(self, tmp_path: Path, argv: list[str], resources: Resources = CPU,
               env: dict[str, str] | None = None, cwd: Path | None = None,
               parent_id: str | None = None, shard_id: int | None = None,
               **options: Any) -> Launch:
        task_id = f"t{os.getpid()}-{next(_ids)}"  # unique on a cluster shared by test runs
        attempt_dir = tmp_path / task_id / "1"
        attempt_dir.mkdir(parents=True)
        return Launch(
            task_id=task_id, attempt=1, argv=argv, cwd=str(cwd or tmp_path),
            env={"PATH": os.environ["PATH"], **(env or {})},
            pool=self.pool(resources, **options), gpu_ids=(), attempt_dir=attempt_dir,
            stdout_path=attempt_dir / "stdout", stderr_path=attempt_dir / "stderr",
            parent_id=parent_id, shard_id=shard_id,
        )

    def start(self, launch: Launch) -> Handle:
        handle: Handle = self.run(self.engine.start(launch))
        return handle

    def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        async def poll() -> None:
            deadline = time.monotonic() + timeout_s
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{what}: not within {timeout_s:g} s")
                await asyncio.sleep(0.02)

        self.run(poll())

    def wait_running(self, launch: Launch, timeout_s: float = 60) -> Handle:
        key = (launch.task_id, launch.attempt)
        self.wait(lambda: key in self.events.started or key in self.events.ended, timeout_s,
                  f"{launch.task_id} running")
        assert key in self.events.started, self.events.ended.get(key)
        return self.events.started[key]

    def wait_exit(self, launch: Launch, timeout_s: float = 60) -> Exit:
        key = (launch.task_id, launch.attempt)
        self.wait(lambda: key in self.events.ended, timeout_s, f"{launch.task_id} exited")
        assert not self.events.errors, self.events.errors
        return self.events.ended[key]

    def wait_output(self, launch: Launch, text: str, timeout_s: float = 30) -> None:
        self.wait(lambda: launch.stdout_path.exists()
                  and text in launch.stdout_path.read_text(), timeout_s, f"output {text!r}")

    def run_to_end(self, launch: Launch, timeout_s: float = 60) -> Exit:
        self.start(launch)
        return self.wait_exit(launch, timeout_s)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


GROUP = ["sh", "-c", "sleep 1000 & echo $$ $!; wait"]  # a process group of two


def group_pids(harness: Harness, launch: Launch) -> list[int]:
    """The pids of a GROUP's shell and its sleep, once it printed them."""
    harness.wait_output(launch, "\n")
    return [int(p) for p in launch.stdout_path.read_text().split()]


@contextlib.contextmanager
def harness(kind: str, build: BuildEngine, options: dict[str, Any]) -> Iterator[Harness]:
    """A Harness on a new event loop, its engine closed and the loop with it at the end."""
    loop = asyncio.new_event_loop()
    h = Harness(kind, build, options, loop)
    try:
        h.run(h.engine.check(h.pool()))
        yield h
    finally:
        h.close()
        loop.close()


def local_harness() -> contextlib.AbstractContextManager[Harness]:
    from velda.engines.local import LocalEngine

    return harness("local", lambda pool, events: LocalEngine(events, None, None), {})


def ray_harness(address: str, **options: Any) -> contextlib.AbstractContextManager[Harness]:
    from velda.engines.ray import RayEngine

    return harness("ray", RayEngine, {"address": address, "workdir": "shared", **options})


def slurm_harness(**options: Any) -> contextlib.AbstractContextManager[Harness]:
    """On the partition `debug` of the cluster whose commands are first on PATH."""
    from velda.engines.slurm import SlurmEngine

    return harness("slurm", SlurmEngine, {"partition": "debug", **options})
