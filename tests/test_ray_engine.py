"""RayEngine against a real two-node Ray cluster on loopback (see ray_cluster.py).

The tests drive the engine directly, as the server does, and record what it reports through
EngineEvents. One engine (one bridge process) serves the whole module; each test uses its
own task IDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_cluster import RayCluster, start_cluster
from velda.engines.base import EngineError, Handle, Launch, NotStartedError
from velda.engines.ray import RayEngine
from velda.models import Exit, Pool, Reason, Resources
from velda_cli import alive

pytestmark = pytest.mark.ray

CPU = Resources(cpus=1)
_ids = itertools.count(1)


class Recorder:
    """An EngineEvents that checks the contract: on the loop thread, running at most once and
    before exited, exited exactly once."""

    def __init__(self) -> None:
        self.loop_thread: int | None = None
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
    def __init__(self, loop: asyncio.AbstractEventLoop, engine: RayEngine,
                 events: Recorder, address: str) -> None:
        self.loop = loop
        self.engine = engine
        self.events = events
        self.address = address

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def launch(self, tmp_path: Path, argv: list[str], resources: Resources = CPU,
               env: dict[str, str] | None = None, cwd: Path | None = None,
               workdir: str = "shared") -> Launch:
        task_id = f"t{next(_ids)}"
        attempt_dir = tmp_path / task_id / "1"
        attempt_dir.mkdir(parents=True)
        pool = Pool("ray", "ray", resources, {"address": self.address, "workdir": workdir})
        return Launch(
            task_id=task_id, attempt=1, argv=argv, cwd=str(cwd or tmp_path),
            env={"PATH": os.environ["PATH"], **(env or {})}, pool=pool, gpu_ids=(),
            attempt_dir=attempt_dir, stdout_path=attempt_dir / "stdout",
            stderr_path=attempt_dir / "stderr",
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

    def run_to_end(self, launch: Launch, timeout_s: float = 60) -> Exit:
        self.start(launch)
        return self.wait_exit(launch, timeout_s)

    def wait_output(self, launch: Launch, text: str, timeout_s: float = 30) -> None:
        self.wait(lambda: launch.stdout_path.exists()
                  and text in launch.stdout_path.read_text(), timeout_s, f"output {text!r}")


@pytest.fixture(scope="module")
def ray(ray_cluster: RayCluster) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    events = Recorder()
    events.loop_thread = threading.get_ident()
    pool = Pool("ray", "ray", CPU, {"address": ray_cluster.address})
    engine = RayEngine(pool, events)
    harness = Harness(loop, engine, events, ray_cluster.address)
    harness.run(engine.check(pool))
    try:
        yield harness
    finally:
        harness.run(engine.close())
        loop.close()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


GROUP = ["sh", "-c", "sleep 1000 & echo $$ $!; wait"]  # a process group of two


def group_pids(harness: Harness, launch: Launch) -> list[int]:
    harness.wait_output(launch, "\n")
    return [int(p) for p in launch.stdout_path.read_text().split()]


# The same bytes are computed here and written by the task: ~5 MB of stdout in pieces of
# every size, interleaved with stderr lines, so a lost, doubled, reordered or crossed byte
# shows.
OUT_EXPR = 'b"".join(b"%07d out %s\\n" % (i, b"x" * (i % 61)) for i in range(120000))'
ERR_EXPR = 'b"".join(b"%05d err\\n" % i for i in range(20000))'
WRITER = f"""
import os
out, err = {OUT_EXPR}, {ERR_EXPR}
o = e = 0
size = 1
while o < len(out) or e < len(err):
    if o < len(out):
        o += os.write(1, out[o:o + size])
        size = size * 7 % 9973 + 1
    if e < len(err) and o % 5 == 0:
        end = err.index(b"\\n", e) + 1
        e += os.write(2, err[e:end])
    elif o >= len(out):
        e += os.write(2, err[e:])
"""


def test_output_lands_in_the_files_exactly(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python(WRITER))
    assert ray.run_to_end(launch) == Exit(0)
    out, err = eval(OUT_EXPR), eval(ERR_EXPR)
    assert len(out) > 5_000_000
    assert launch.stdout_path.read_bytes() == out
    assert launch.stderr_path.read_bytes() == err


def test_output_streams_while_running(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python(
        "import sys, time; print('first', flush=True); time.sleep(30)"))
    ray.start(launch)
    ray.wait_running(launch)
    ray.wait_output(launch, "first\n", timeout_s=10)
    assert (launch.task_id, 1) not in ray.events.ended
    ray.run(ray.engine.cancel(ray.events.started[(launch.task_id, 1)], 5))
    assert ray.wait_exit(launch).signal == signal.SIGTERM


def test_exit_codes_and_signals(ray: Harness, tmp_path: Path) -> None:
    cases = {
        "true": Exit(0),
        "exit 3": Exit(3, None, Reason.EXIT),
        "kill -TERM $$": Exit(None, signal.SIGTERM, Reason.SIGNAL),
        "kill -KILL $$": Exit(None, signal.SIGKILL, Reason.SIGNAL),
    }
    launches = {script: ray.launch(tmp_path, ["sh", "-c", script]) for script in cases}
    for launch in launches.values():
        ray.start(launch)
    for script, launch in launches.items():
        assert ray.wait_exit(launch) == cases[script], script
        assert (launch.task_id, 1) in ray.events.started


def test_env_and_cwd(ray: Harness, tmp_path: Path) -> None:
    workdir = tmp_path / "project dir"
    workdir.mkdir()
    launch = ray.launch(tmp_path, python(
        "import json, os; print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ)}))"),
        env={"FOO": "bar baz", "CUDA_VISIBLE_DEVICES": "7", "VELDA_SERVER": "http://127.0.0.1:1"},
        cwd=workdir)
    assert ray.run_to_end(launch) == Exit(0)
    seen = json.loads(launch.stdout_path.read_text())
    assert seen["cwd"] == str(workdir)
    assert seen["env"]["FOO"] == "bar baz"
    assert seen["env"]["PWD"] == str(workdir)
    assert seen["env"]["VELDA_SERVER"] == "http://127.0.0.1:1"  # the launch's, as given
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""  # not the submitter's: no GPU asked
    assert seen["env"]["RAY_ADDRESS"] == ray.address


def test_custom_resource_places_the_task_on_node2(ray: Harness, ray_cluster: RayCluster,
                                                  tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, ["true"], Resources(cpus=1, custom=(("node2_slot", 1.0),)))
    assert ray.run_to_end(launch) == Exit(0)
    handle = ray.events.started[(launch.task_id, 1)]
    assert handle["node_id"] == ray_cluster.node2_id
    assert handle["key"] == f"{launch.task_id}/1"


def test_gpu_pool_sees_the_gpu_ray_assigned(ray: Harness, ray_cluster: RayCluster,
                                           tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python("import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"),
                        Resources(cpus=1, gpus=1), env={"CUDA_VISIBLE_DEVICES": "5,6"})
    assert ray.run_to_end(launch) == Exit(0)
    assert launch.stdout_path.read_text().strip().split(",") == ["0"]
    assert ray.events.started[(launch.task_id, 1)]["node_id"] == ray_cluster.head_id


def test_upload_workdir_ships_the_directory(ray: Harness, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.txt").write_text("shipped\n")
    launch = ray.launch(tmp_path, python(
        "import os; print(open('data.txt').read().strip(), os.getcwd() == os.environ['PWD'],"
        " os.getcwd())"), cwd=project, workdir="upload")
    assert ray.run_to_end(launch, timeout_s=120) == Exit(0), launch.stderr_path.read_text()
    word, same, cwd = launch.stdout_path.read_text().split()
    assert (word, same) == ("shipped", "True")
    assert cwd != str(project)


def test_cancel_kills_the_process_group(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, GROUP)
    handle = ray.start(launch)
    pids = group_pids(ray, launch)
    started = time.monotonic()
    ray.run(ray.engine.cancel(handle, 10))
    assert ray.wait_exit(launch) == Exit(None, signal.SIGTERM, Reason.SIGNAL)
    assert time.monotonic() - started < 5
    ray.wait(lambda: not any(map(alive, pids)), 5, "the whole group gone")


def test_cancel_escalates_to_sigkill_after_the_grace_period(ray: Harness,
                                                            tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(1000)"))
    handle = ray.start(launch)
    ray.wait_output(launch, "ready")
    started = time.monotonic()
    ray.run(ray.engine.cancel(handle, 1))
    assert ray.wait_exit(launch) == Exit(None, signal.SIGKILL, Reason.SIGNAL)
    assert 1 <= time.monotonic() - started < 6


def test_cancel_before_it_starts(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, ["true"], Resources(cpus=1, custom=(("no_such_slot", 1.0),)))
    handle = ray.start(launch)
    time.sleep(0.5)
    ray.run(ray.engine.cancel(handle, 10))
    assert ray.wait_exit(launch, timeout_s=30) == Exit(None, None, Reason.CANCELLED)
    assert (launch.task_id, 1) not in ray.events.started


def test_signal_reaches_the_process(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda n, f: (print('got', n, flush=True), sys.exit(0)))\n"
        "print('ready', flush=True); time.sleep(1000)"))
    handle = ray.start(launch)
    ray.wait_output(launch, "ready")
    ray.run(ray.engine.signal(handle, signal.SIGINT))
    assert ray.wait_exit(launch) == Exit(0)
    assert launch.stdout_path.read_text() == f"ready\ngot {int(signal.SIGINT)}\n"


def test_command_not_found_and_missing_cwd(ray: Harness, tmp_path: Path) -> None:
    missing = ray.launch(tmp_path, ["velda-no-such-command"])
    no_dir = ray.launch(tmp_path, ["true"], cwd=tmp_path / "gone")
    assert ray.run_to_end(missing) == Exit(127, None, Reason.EXIT)
    assert "velda: cannot run" in missing.stderr_path.read_text()
    assert ray.run_to_end(no_dir) == Exit(126, None, Reason.EXIT)
    assert "does not exist" in no_dir.stderr_path.read_text()


def test_a_blocked_attempt_lends_its_cpus(ray: Harness, tmp_path: Path) -> None:
    # The holder takes both CPUs of the second node; the waiter needs one of them.
    on_node2 = (("node2_slot", 0.5),)
    holder = ray.launch(tmp_path, GROUP, Resources(cpus=2, custom=on_node2))
    waiter = ray.launch(tmp_path, ["true"], Resources(cpus=1, custom=on_node2))
    handle = ray.start(holder)
    ray.wait_running(holder)
    ray.start(waiter)
    time.sleep(1)
    assert (waiter.task_id, 1) not in ray.events.started
    ray.run(ray.engine.lend_cpus(handle, True))
    assert ray.wait_exit(waiter, 30) == Exit(0)
    ray.run(ray.engine.lend_cpus(handle, False))
    assert (holder.task_id, 1) not in ray.events.ended
    ray.run(ray.engine.cancel(handle, 5))
    assert ray.wait_exit(holder).signal == signal.SIGTERM


def test_a_node_that_stops_answering_loses_its_attempt(ray: Harness, tmp_path: Path) -> None:
    # A stopped Ray worker stands for a node gone without a word: its connections stay open,
    # so Ray's own health checks would take about a minute.
    events = Recorder()
    events.loop_thread = threading.get_ident()
    pool = Pool("ray", "ray", CPU, {"address": ray.address, "node_timeout": 2})
    engine = RayEngine(pool, events)
    harness = Harness(ray.loop, engine, events, ray.address)
    launch = harness.launch(tmp_path, ["sh", "-c", "echo $PPID $$; sleep 1000"])
    harness.start(launch)
    harness.wait_output(launch, "\n")
    worker, command = (int(p) for p in launch.stdout_path.read_text().split())
    os.kill(worker, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert harness.wait_exit(launch, 30) == Exit(None, None, Reason.LOST)
        assert time.monotonic() - started < 10
        assert "stopped answering for 2 s" in launch.stderr_path.read_text()
        harness.wait(lambda: not alive(worker) and not alive(command), 30,
                     "the silent worker and its command killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        harness.run(engine.close())


def new_engine(ray: Harness) -> tuple[RayEngine, Recorder]:
    """Another engine on the same cluster, as a restarted server would have."""
    events = Recorder()
    events.loop_thread = threading.get_ident()
    return RayEngine(Pool("ray", "ray", CPU, {"address": ray.address}), events), events


def test_adopt_after_a_restart_follows_the_attempt_to_its_end(ray: Harness,
                                                             tmp_path: Path) -> None:
    old, _ = new_engine(ray)
    launch = ray.launch(tmp_path, ["sh", "-c", "echo one; sleep 2; echo two"])
    ray.run(old.start(launch))
    ray.wait_output(launch, "one\n")
    ray.run(old.close())  # the server stops; its bridge finishes the attempt
    engine, events = new_engine(ray)
    ray.run(engine.adopt(launch.task_id, 1, {"key": f"{launch.task_id}/1"}, launch))
    key = (launch.task_id, 1)
    assert events.started[key]["pid"] > 0
    ray.wait(lambda: key in events.ended, 30, "adopted attempt exited")
    assert events.ended[key] == Exit(0)
    assert launch.stdout_path.read_text() == "one\ntwo\n"
    assert not events.errors


def test_an_adopted_attempt_can_be_cancelled(ray: Harness, tmp_path: Path) -> None:
    old, _ = new_engine(ray)
    launch = ray.launch(tmp_path, GROUP)
    ray.run(old.start(launch))
    pids = group_pids(ray, launch)
    ray.run(old.close())
    engine, events = new_engine(ray)
    ray.run(engine.adopt(launch.task_id, 1, {"key": f"{launch.task_id}/1"}, launch))
    ray.run(engine.cancel({"key": f"{launch.task_id}/1"}, 5))
    key = (launch.task_id, 1)
    ray.wait(lambda: key in events.ended, 30, "adopted attempt exited")
    assert events.ended[key] == Exit(None, signal.SIGTERM, Reason.SIGNAL)
    ray.wait(lambda: not any(map(alive, pids)), 5, "the whole group gone")


def test_adopt_reports_an_attempt_that_ended_meanwhile(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, ["sh", "-c", "exit 4"])
    assert ray.run_to_end(launch) == Exit(4, None, Reason.EXIT)
    engine, events = new_engine(ray)
    ray.run(engine.adopt(launch.task_id, 1, {}, launch))
    assert events.ended[(launch.task_id, 1)] == Exit(4, None, Reason.EXIT)
    assert (launch.task_id, 1) in events.started


def test_adopt_of_an_attempt_never_handed_to_ray_requeues_it(ray: Harness,
                                                             tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, ["true"])
    engine, _ = new_engine(ray)
    with pytest.raises(NotStartedError):
        ray.run(engine.adopt(launch.task_id, 1, {"submitted": True}, launch))


def test_a_dead_driver_loses_its_attempts_and_the_next_start_works(
    ray: Harness, tmp_path: Path
) -> None:
    launch = ray.launch(tmp_path, GROUP)
    ray.start(launch)
    pids = group_pids(ray, launch)
    bridge = ray.engine._bridge
    assert bridge is not None
    bridge.proc.kill()
    assert ray.wait_exit(launch, 30) == Exit(None, None, Reason.LOST)
    assert "Ray driver exited" in launch.stderr_path.read_text()
    ray.wait(lambda: not any(map(alive, pids)), 30, "the work of a dead driver killed")
    again = ray.launch(tmp_path, ["true"])
    assert ray.run_to_end(again) == Exit(0)


def test_unreachable_cluster_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    pool = Pool("ray", "ray", CPU, {"address": address})
    engine = RayEngine(pool, Recorder())
    started = time.monotonic()
    with pytest.raises(EngineError, match=f"ray cluster at {address} is not reachable"):
        asyncio.run(engine.check(pool))
    assert time.monotonic() - started < 3


def test_an_address_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        pool = Pool("ray", "ray", CPU, {"address": address, "connect_timeout": 5})
        engine = RayEngine(pool, Recorder())
        started = time.monotonic()
        with pytest.raises(EngineError, match="is not reachable"):
            asyncio.run(engine.check(pool))
        assert time.monotonic() - started < 10


def test_a_dead_node_ends_its_task_as_lost(ray: Harness, ray_cluster: RayCluster,
                                          tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, GROUP, Resources(cpus=1, custom=(("node2_slot", 1.0),)))
    ray.start(launch)
    assert ray.wait_running(launch)["node_id"] == ray_cluster.node2_id
    pids = group_pids(ray, launch)
    ray_cluster.kill_node2()
    assert ray.wait_exit(launch, 60) == Exit(None, None, Reason.LOST)
    assert "velda: ray lost the worker running it" in launch.stderr_path.read_text()
    ray.wait(lambda: not any(map(alive, pids)), 30, "the work of a dead node killed")


def test_a_dead_head_fails_running_tasks_with_a_clear_message(tmp_path: Path) -> None:
    # Only the GCS dies: the node and its work would run on, unseen, if nothing noticed.
    cluster = start_cluster(single=True)
    loop = asyncio.new_event_loop()
    events = Recorder()
    events.loop_thread = threading.get_ident()
    pool = Pool("ray", "ray", CPU, {"address": cluster.address, "head_timeout": 3})
    engine = RayEngine(pool, events)
    harness = Harness(loop, engine, events, cluster.address)
    try:
        launch = harness.launch(tmp_path, GROUP)
        harness.start(launch)
        pids = group_pids(harness, launch)
        cluster.kill_gcs()
        assert harness.wait_exit(launch, 60) == Exit(None, None, Reason.LOST)
        assert "stopped answering" in launch.stderr_path.read_text()
        harness.wait(lambda: not any(map(alive, pids)), 10, "the work of a lost cluster killed")
        with pytest.raises(EngineError, match="is not reachable"):
            harness.run(engine.check(pool))
    finally:
        harness.run(engine.close())
        loop.close()
        cluster.stop()
