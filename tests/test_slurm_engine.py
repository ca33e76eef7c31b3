"""SlurmEngine against a real two-node Slurm cluster on loopback (see slurm_cluster.py).

The tests drive the engine directly, as the server does, and record what it reports through
EngineEvents. The engine finds the Slurm commands on PATH, as on any cluster: here they are
small scripts that run the real ones inside the cluster's network namespace, so velda does not
know about the namespace. One engine serves the whole module; each test uses its own task IDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_cluster import SlurmCluster
from velda.engines.base import EngineError, Handle, Launch, NotStartedError
from velda.engines.slurm import SlurmEngine
from velda.engines.status_file import read_int
from velda.models import Exit, Pool, Reason, Resources
from velda_cli import alive

CPU = Resources(cpus=1)
TOOLS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
_ids = itertools.count(1)


class Recorder:
    """An EngineEvents that checks the contract: on the loop thread, running at most once and
    before exited, exited exactly once."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.started: dict[tuple[str, int], Handle] = {}
        self.ended: dict[tuple[str, int], Exit] = {}
        self.errors: list[str] = []

    def running(self, task_id: str, attempt: int, handle: Handle) -> None:
        key = (task_id, attempt)
        self._check_thread()
        if key in self.started or key in self.ended:
            self.errors.append(f"running {key} after running or exited")
        self.started[key] = handle

    def exited(self, task_id: str, attempt: int, exit: Exit) -> None:
        key = (task_id, attempt)
        self._check_thread()
        if key in self.ended:
            self.errors.append(f"exited {key} twice")
        self.ended[key] = exit

    def _check_thread(self) -> None:
        if threading.get_ident() != self.loop_thread:
            self.errors.append("event called off the event loop thread")


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, engine: SlurmEngine,
                 events: Recorder) -> None:
        self.loop = loop
        self.engine = engine
        self.events = events

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def launch(self, tmp_path: Path, argv: list[str], resources: Resources = CPU,
               env: dict[str, str] | None = None, parent_id: str | None = None,
               shard_id: int | None = None) -> Launch:
        task_id = f"t{os.getpid()}-{next(_ids)}"
        attempt_dir = tmp_path / task_id / "1"
        attempt_dir.mkdir(parents=True)
        return Launch(
            task_id=task_id, attempt=1, argv=argv, cwd=str(tmp_path),
            env={"PATH": os.environ["PATH"], **(env or {})},
            pool=Pool("slurm", "slurm", resources, {"partition": "debug"}), gpu_ids=(),
            attempt_dir=attempt_dir, stdout_path=attempt_dir / "stdout",
            stderr_path=attempt_dir / "stderr", parent_id=parent_id, shard_id=shard_id,
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
                await asyncio.sleep(0.05)

        self.run(poll())

    def wait_running(self, launch: Launch, events: Recorder | None = None,
                     timeout_s: float = 30) -> Handle:
        events = events or self.events
        key = (launch.task_id, launch.attempt)
        self.wait(lambda: key in events.started or key in events.ended, timeout_s,
                  f"{launch.task_id} running")
        assert key in events.started, events.ended.get(key)
        return events.started[key]

    def wait_exit(self, launch: Launch, events: Recorder | None = None,
                  timeout_s: float = 30) -> Exit:
        events = events or self.events
        key = (launch.task_id, launch.attempt)
        self.wait(lambda: key in events.ended, timeout_s, f"{launch.task_id} exited")
        assert not events.errors, events.errors
        return events.ended[key]

    def wait_ready(self, launch: Launch, events: Recorder | None = None) -> None:
        """Until the command runs and printed its first line, "ready"."""
        self.wait_running(launch, events)
        self.wait(lambda: launch.stdout_path.exists()
                  and launch.stdout_path.read_text() == "ready\n", 10, "ready")

    def run_to_end(self, launch: Launch) -> Exit:
        self.start(launch)
        return self.wait_exit(launch)


def write_tools(bin_dir: Path, slurm: SlurmCluster, namespaced: bool = True) -> None:
    """Scripts named like the Slurm commands that run the real ones against the cluster."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    enter = " ".join(slurm.prefix) + " " if namespaced else ""
    for tool in TOOLS:
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\nexport SLURM_CONF={slurm.env['SLURM_CONF']}\n"
                        f'exec {enter}/usr/bin/{tool} "$@"\n')
        path.chmod(0o755)


@pytest.fixture(scope="module")
def harness(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    bin_dir = tmp_path_factory.mktemp("slurm-bin")
    write_tools(bin_dir, slurm)
    loop = asyncio.new_event_loop()
    events = Recorder()
    pool = Pool("slurm", "slurm", CPU, {"partition": "debug"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        engine = SlurmEngine(pool, events)
        h = Harness(loop, engine, events)
        h.run(engine.check(pool))
        try:
            yield h
        finally:
            h.run(engine.close())
            loop.close()


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_exit_codes_and_signals_are_exact(harness: Harness, tmp_path: Path) -> None:
    cases = {
        "exit 0": Exit(0),
        "exit 3": Exit(3, None, Reason.EXIT),
        "kill -TERM $$": Exit(None, signal.SIGTERM, Reason.SIGNAL),
        "kill -KILL $$": Exit(None, signal.SIGKILL, Reason.SIGNAL),
    }
    launches = [harness.launch(tmp_path, sh(script)) for script in cases]
    results = harness.run(harness.engine.start_many(launches))
    assert all(isinstance(r, dict) for r in results), results
    assert len({r["job"] for r in results}) == len(cases)  # one job each
    assert [harness.wait_exit(launch) for launch in launches] == list(cases.values())
    assert all((launch.task_id, 1) in harness.events.started for launch in launches)


# stdout and stderr interleaved in pieces of every size, with bytes that are not UTF-8 and no
# final newline, so a lost, doubled, reordered or re-encoded byte shows.
OUT_EXPR = 'b"".join(b"%06d out \\xff%s\\n" % (i, b"x" * (i % 61)) for i in range(20000)) + b"end"'
ERR_EXPR = 'b"".join(b"%05d err\\n" % i for i in range(5000))'
WRITER = f"""
import os
out, err = {OUT_EXPR}, {ERR_EXPR}
o = e = 0
size = 1
while o < len(out) or e < len(err):
    if o < len(out):
        o += os.write(1, out[o:o + size])
        size = size * 7 % 997 + 1
    if e < len(err):
        end = err.index(b"\\n", e) + 1
        e += os.write(2, err[e:end])
"""


def test_output_lands_in_the_files_byte_for_byte(harness: Harness, tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, [sys.executable, "-c", WRITER])
    assert harness.run_to_end(launch) == Exit(0)
    assert launch.stdout_path.read_bytes() == eval(OUT_EXPR)
    assert launch.stderr_path.read_bytes() == eval(ERR_EXPR)


def test_the_task_gets_its_environment_and_working_directory(harness: Harness,
                                                            tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh('echo "$GREETING" "$PWD" "${SLURM_JOB_ID:+job}"'),
                            env={"GREETING": "it's a \"quoted\" $VALUE\nwith a newline",
                                 "SLURM_JOB_ID": "from-the-submitter"})
    assert harness.run_to_end(launch) == Exit(0)
    assert launch.stdout_path.read_text() == (
        f"it's a \"quoted\" $VALUE\nwith a newline {tmp_path} job\n")


def test_cancel_ends_a_job_and_kills_one_that_ignores_sigterm(harness: Harness,
                                                              tmp_path: Path) -> None:
    polite = harness.launch(tmp_path, sh("echo ready; exec sleep 60"))
    stubborn = harness.launch(tmp_path, sh("trap '' TERM; echo ready; sleep 60 & wait"))
    for launch in (polite, stubborn):
        harness.start(launch)
    for launch in (polite, stubborn):
        harness.wait_ready(launch)
    started = time.monotonic()
    for launch in (polite, stubborn):
        harness.run(harness.engine.cancel(harness.events.started[(launch.task_id, 1)], 1))
    assert harness.wait_exit(polite).signal == signal.SIGTERM
    assert harness.wait_exit(stubborn).signal == signal.SIGKILL
    assert time.monotonic() - started < 10


def test_signal_reaches_the_command(harness: Harness, tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh("trap 'echo got INT; exit 4' INT; echo ready;"
                                         " while :; do sleep 0.1; done"))
    handle = harness.start(launch)
    harness.wait_ready(launch)
    harness.run(harness.engine.signal(handle, signal.SIGINT))
    assert harness.wait_exit(launch) == Exit(4, None, Reason.EXIT)
    assert launch.stdout_path.read_text() == "ready\ngot INT\n"


def test_shards_of_one_parent_are_one_job_array(harness: Harness, tmp_path: Path) -> None:
    argv = sh('echo "shard $SHARD"; exit "$SHARD"')
    shards = [harness.launch(tmp_path, argv, env={"SHARD": str(i)}, parent_id="p1", shard_id=i)
              for i in range(3)]
    alone = harness.launch(tmp_path, sh("exit 0"))
    handles = harness.run(harness.engine.start_many([shards[0], alone, shards[1], shards[2]]))
    array = {h["job"].split("_")[0] for h in (handles[0], handles[2], handles[3])}
    assert len(array) == 1 and handles[1]["job"] not in array, handles
    assert [h["job"].split("_")[1] for h in (handles[0], handles[2], handles[3])] == ["0", "1",
                                                                                      "2"]
    assert [harness.wait_exit(s) for s in shards] == [
        Exit(0), Exit(1, None, Reason.EXIT), Exit(2, None, Reason.EXIT)]
    assert [s.stdout_path.read_text() for s in shards] == [f"shard {i}\n" for i in range(3)]
    assert harness.wait_exit(alone) == Exit(0)


def test_a_gpu_pool_sees_its_device(harness: Harness, tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh('echo "$CUDA_VISIBLE_DEVICES"'),
                            resources=Resources(cpus=1, gpus=1),
                            env={"CUDA_VISIBLE_DEVICES": "7"})
    assert harness.run_to_end(launch) == Exit(0)
    assert launch.stdout_path.read_text() == "0\n"


@pytest.fixture
def restarted(harness: Harness) -> Iterator[tuple[SlurmEngine, Recorder]]:
    """A second engine, as a server started after a crash makes it."""
    events = Recorder()
    engine = SlurmEngine(harness.engine.pool, events)
    try:
        yield engine, events
    finally:
        harness.run(engine.close())


def test_adopt_finds_a_running_job_by_name(harness: Harness, tmp_path: Path,
                                          restarted: tuple[SlurmEngine, Recorder]) -> None:
    engine, events = restarted
    launch = harness.launch(tmp_path, sh("echo ready; exec sleep 60"))
    harness.start(launch)
    harness.wait_ready(launch)
    harness.run(engine.adopt(launch.task_id, 1, {}, launch))  # its handle was never stored
    handle = harness.wait_running(launch, events)
    assert handle["job"] == harness.events.started[(launch.task_id, 1)]["job"]
    harness.run(engine.cancel(handle, 5))
    assert harness.wait_exit(launch, events).signal == signal.SIGTERM


def test_adopt_reports_a_job_that_ended_meanwhile(harness: Harness, tmp_path: Path,
                                                  restarted: tuple[SlurmEngine, Recorder]
                                                  ) -> None:
    engine, events = restarted
    launch = harness.launch(tmp_path, sh("exit 5"))
    handle = harness.start(launch)
    assert harness.wait_exit(launch) == Exit(5, None, Reason.EXIT)
    harness.run(engine.adopt(launch.task_id, 1, handle, launch))
    assert events.ended[(launch.task_id, 1)] == Exit(5, None, Reason.EXIT)


def test_adopt_of_a_job_never_submitted_requeues_it(harness: Harness, tmp_path: Path,
                                                    restarted: tuple[SlurmEngine, Recorder]
                                                    ) -> None:
    engine, events = restarted
    launch = harness.launch(tmp_path, sh("exit 0"))
    with pytest.raises(NotStartedError):
        harness.run(engine.adopt(launch.task_id, 1, {}, launch))
    assert not events.started and not events.ended


def test_check_names_slurmctld_when_it_is_unreachable(harness: Harness, slurm: SlurmCluster,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    write_tools(tmp_path / "bin", slurm, namespaced=False)  # no slurmctld out here
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    pool = harness.engine.pool
    with pytest.raises(EngineError, match="slurmctld is not reachable"):
        harness.run(SlurmEngine(pool, Recorder()).check(pool))


def test_check_names_a_partition_that_does_not_exist(harness: Harness) -> None:
    pool = Pool("slurm", "slurm", CPU, {"partition": "gpu"})
    with pytest.raises(EngineError, match="no partition 'gpu' .*debug"):
        harness.run(harness.engine.check(pool))


def test_a_job_whose_heartbeat_stops_ends_lost(harness: Harness, tmp_path: Path) -> None:
    events = Recorder()
    pool = Pool("slurm", "slurm", CPU, {"partition": "debug", "node_timeout": 2})
    engine = SlurmEngine(pool, events)
    launch = harness.launch(tmp_path, sh("echo ready; exec sleep 60"))
    try:
        handle = harness.run(engine.start(launch))
        harness.wait_ready(launch, events)
        wrapper = read_int(launch.attempt_dir / "pid")
        beat = launch.attempt_dir / "heartbeat"
        while not beat.is_dir():  # the node can no longer write it, as on a dead node
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                beat.unlink()
                beat.mkdir()
        exit = harness.wait_exit(launch, events, timeout_s=15)
        assert exit.reason == Reason.LOST and "heartbeat" in (exit.detail or ""), exit
        assert wrapper is not None and handle["job"]
        harness.wait(lambda: not alive(wrapper), 10, "the job scancelled")
    finally:
        harness.run(engine.close())


def test_cancel_of_a_pending_job_ends_it_before_it_runs(harness: Harness,
                                                        tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh("echo ran"))
    pool = Pool("slurm", "slurm", CPU, {"partition": "debug", "sbatch_args": ["--begin=now+60"]})
    launch = dataclasses.replace(launch, pool=pool)
    handle = harness.start(launch)
    harness.run(harness.engine.cancel(handle, 5))
    assert harness.wait_exit(launch).signal == signal.SIGKILL
    assert (launch.task_id, 1) not in harness.events.started
    assert not launch.stdout_path.exists()


def test_a_job_slurm_refuses_is_an_engine_error(harness: Harness, tmp_path: Path) -> None:
    too_many_gpus = Resources(cpus=1, gpus=8)  # no node has as many
    launch = harness.launch(tmp_path, sh("exit 0"), resources=too_many_gpus)
    with pytest.raises(EngineError, match="^sbatch: .*node configuration is not available"):
        harness.start(launch)
    results = harness.run(harness.engine.start_many([launch]))
    assert isinstance(results[0], EngineError)
