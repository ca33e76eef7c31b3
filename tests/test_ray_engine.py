"""RayEngine against a real two-node Ray cluster on loopback (see ray_cluster.py): what only
the Ray engine does (placement by resources, shipping a working directory, lending CPUs, lost
nodes, drivers and heads). What every engine does is in test_engine_contract.py.

The tests drive the engine directly, as the server does (engine_harness.py). One engine (one
bridge process) serves the whole module; each test uses its own task IDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_harness import CPU, GROUP, Harness, Recorder, group_pids, python, ray_harness
from ray_cluster import RayCluster, start_cluster
from velda.engines.base import EngineError
from velda.engines.ray import RayEngine
from velda.models import Exit, Pool, Reason, Resources
from velda_cli import alive

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray(ray_cluster: RayCluster) -> Iterator[Harness]:
    with ray_harness(ray_cluster.address) as harness:
        yield harness


def test_the_command_finds_its_cluster(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, python("import os; print(os.environ['RAY_ADDRESS'])"))
    assert ray.run_to_end(launch) == Exit(0)
    assert launch.stdout_path.read_text() == f"{ray.options['address']}\n"


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


def test_cancel_before_it_starts(ray: Harness, tmp_path: Path) -> None:
    launch = ray.launch(tmp_path, ["true"], Resources(cpus=1, custom=(("no_such_slot", 1.0),)))
    handle = ray.start(launch)
    time.sleep(0.5)
    ray.run(ray.engine.cancel(handle, 10))
    assert ray.wait_exit(launch, timeout_s=30) == Exit(None, None, Reason.CANCELLED)
    assert (launch.task_id, 1) not in ray.events.started


def test_many_attempts_started_at_once_each_run_once_with_their_own_output(
        ray: Harness, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    script = 'echo "out $N"; echo "err $N" >&2; echo "$N" >> "$RAN"; exit $((N % 4))'
    launches = [ray.launch(tmp_path, ["sh", "-c", script], env={"N": str(n), "RAN": str(ran)})
                for n in range(24)]
    handles = ray.run(ray.engine.start_many(launches))
    assert [h["key"] for h in handles] == [f"{launch.task_id}/1" for launch in launches]
    for n, launch in enumerate(launches):
        assert ray.wait_exit(launch) == Exit(n % 4, None, Reason.EXIT if n % 4 else None)
        assert launch.stdout_path.read_text() == f"out {n}\n"
        assert launch.stderr_path.read_text() == f"err {n}\n"
        assert (launch.task_id, 1) in ray.events.started
    assert sorted(int(line) for line in ran.read_text().split()) == list(range(24))


def _lines(first: int, last: int) -> str:
    return "".join(f"{n}\n" for n in range(first, last + 1))


@pytest.mark.parametrize(("script", "out", "err"), [
    ("seq 3; seq 2 >&2", _lines(1, 3), _lines(1, 2)),  # all of it comes with the exit
    ("seq 100000; seq 50000 >&2", _lines(1, 100000), _lines(1, 50000)),  # too much to hold
    ("seq 10; seq 5 >&2; sleep 0.1; seq 11 20; seq 6 9 >&2", _lines(1, 20), _lines(1, 9)),
], ids=["short", "large", "long"])
def test_output_comes_back_exactly_whether_held_or_streamed(
        ray: Harness, tmp_path: Path, script: str, out: str, err: str) -> None:
    # A short command's record comes back with its exit; one that writes more than the node
    # holds, or runs on, streams it to the bridge over TCP (ray_node.py).
    launch = ray.launch(tmp_path, ["sh", "-c", f"{script}; exit 3"])
    assert ray.run_to_end(launch, timeout_s=120) == Exit(3, None, Reason.EXIT)
    assert launch.stdout_path.read_text() == out
    assert launch.stderr_path.read_text() == err
    assert ray.events.started[(launch.task_id, 1)]["pid"] > 0


def test_a_working_directory_missing_on_the_node_fails_the_attempt(ray: Harness,
                                                                   tmp_path: Path) -> None:
    no_dir = ray.launch(tmp_path, ["true"], cwd=tmp_path / "gone")
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
    # so Ray's own health checks would take about a minute. The bridge asks all running
    # attempts in one round: the other one, whose worker answers, runs on.
    harness = ray.with_options(node_timeout=2)
    launch = harness.launch(tmp_path / "silent", ["sh", "-c", "echo $PPID $$; sleep 1000"])
    other = harness.launch(tmp_path / "answering", ["sh", "-c", "echo up; sleep 1000"])
    harness.start(launch)
    harness.start(other)
    harness.wait_output(launch, "\n")
    harness.wait_output(other, "up\n")
    worker, command = (int(p) for p in launch.stdout_path.read_text().split())
    os.kill(worker, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert harness.wait_exit(launch, 30) == Exit(None, None, Reason.LOST)
        assert time.monotonic() - started < 10
        assert "stopped answering for 2 s" in launch.stderr_path.read_text()
        harness.wait(lambda: not alive(worker) and not alive(command), 30,
                     "the silent worker and its command killed")
        time.sleep(3)  # past another node timeout: the answering one is not lost
        assert (other.task_id, 1) not in harness.events.ended
        harness.run(harness.engine.cancel(harness.events.started[(other.task_id, 1)], 0))
        assert harness.wait_exit(other, 30).reason is not Reason.LOST
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
        harness.close()


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
    try:
        with ray_harness(cluster.address, head_timeout=3) as harness:
            launch = harness.launch(tmp_path, GROUP)
            harness.start(launch)
            pids = group_pids(harness, launch)
            cluster.kill_gcs()
            assert harness.wait_exit(launch, 60) == Exit(None, None, Reason.LOST)
            assert "stopped answering" in launch.stderr_path.read_text()
            harness.wait(lambda: not any(map(alive, pids)), 10,
                         "the work of a lost cluster killed")
            with pytest.raises(EngineError, match="is not reachable"):
                harness.run(harness.engine.check(harness.pool()))
    finally:
        cluster.stop()
