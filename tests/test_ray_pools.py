"""Ray pools end to end: the real server and commands, pools served by the real two-node Ray
cluster of ray_cluster.py (SPEC §4.7, §5, §6, §10).

One server serves the whole module (each Ray pool's driver starts once): its velda.toml maps
the example pipelines' pools gpu-1, cpu-1 and cpu-2 to Ray, adds a pool pinned to the second
node, a pool that uploads its working directory and one whose cluster is not there. `shell`
stays local, so the same pipelines mix local and Ray tasks.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hog import MB, hog_command, wait_for
from pipelines import examples_as_cwd, make_data, parse_time, run_linear
from pty_session import (
    typed_input_reaches_a_shell_and_its_exit_code_comes_back,
    vrun_has_a_terminal,
)
from ray_cluster import RayCluster
from remote_pools import (
    a_cancel_right_after_the_submit_stops_the_task,
    cancel_kills_the_process_on_its_node,
    exit_codes_and_signals_are_recorded,
    explain,
    stdout_and_stderr_come_back_separately_and_exactly,
    vbatch_inside_a_task_makes_children,
    wait_for_output,
)
from velda_cli import Velda, cancel_open_tasks, free_port

pytestmark = pytest.mark.ray

LOST_WITHIN_S = 60  # SPEC §10


def config(address: str, gone: str) -> str:
    ray = f'engine = "ray"\naddress = "{address}"'
    return f"""
[pools.gpu-1]
{ray}
gpus = 1
cpus = 1

[pools.cpu-1]
{ray}
cpus = 1

[pools.cpu-2]
{ray}
cpus = 2

[pools.node2]  # half a slot: two tasks fit on the second node at once
{ray}
cpus = 0.5
resources = {{node2_slot = 0.5}}

[pools.upload]
{ray}
workdir = "upload"

[pools.gone]
engine = "ray"
address = "{gone}"
"""


@pytest.fixture(scope="module")
def velda(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Velda]:
    root = tmp_path_factory.mktemp("ray-pools")
    v = Velda(root / "home", root / "work")
    v.configure(config(ray_cluster.address, f"127.0.0.1:{free_port()}"))
    try:
        yield v
    finally:
        cancel_open_tasks(v)
        v.shutdown()


@pytest.fixture
def example(velda: Velda, tmp_path: Path) -> Iterator[Path]:
    """A writable copy of the example pipelines, as the current directory."""
    with examples_as_cwd(velda, tmp_path / "ml-pipeline") as path:
        yield path


# Run as a task: prints the ID of the Ray node it runs on, read from the command line of the
# raylet among its ancestors (the Ray worker that started it is the raylet's child).
WHERE = """
import os
pid = os.getppid()
while pid > 1:
    args = open(f"/proc/{pid}/cmdline").read().split(chr(0))
    ids = [a[len("--node_id="):] for a in args if a.startswith("--node_id=")]
    if ids:
        print(ids[0])
        break
    pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
"""


def where(then: str = "") -> list[str]:
    """A command that prints its Ray node's ID, then runs the shell script `then`."""
    return ["sh", "-c", f'{sys.executable} -c "$0"; {then}', WHERE]


# ---------------------------------------------------------------- the example pipelines


def test_linear_pipeline_runs_on_ray(velda: Velda, example: Path) -> None:
    run_linear(velda, example, timeout=90)


def test_pipeline_fans_out_from_inside_a_ray_task(velda: Velda, example: Path) -> None:
    # preprocess (cpu-2 on Ray) runs `vrun -P cpu-1` once per file from its node
    make_data(velda, 4)
    preprocess_id, train_id, eval_id = velda.run("./pipeline.sh", check=True).stdout.split()
    assert velda.wait(eval_id, timeout=120)["status"] == "SUCCESS", explain(velda, preprocess_id)
    preprocess, train = velda.get(preprocess_id), velda.get(train_id)
    grandchildren = velda.children(preprocess_id)
    assert len(grandchildren) == 4
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in grandchildren)
    assert preprocess["children"]["succeeded"] == 4
    latest = max(parse_time(c["resolved_at"]) for c in grandchildren)
    assert parse_time(train["started_at"]) >= max(latest, parse_time(preprocess["resolved_at"]))
    first = velda.log(grandchildren[0]["id"])
    assert first.stdout == "part-00.csv: kept 200, dropped 1\n"
    assert first.stderr == "part-00.csv: dropped 1 bad rows\n"


def test_fanout_from_a_local_task_to_ray_children(velda: Velda, example: Path) -> None:
    make_data(velda, 3)
    parent_id = velda.run("./fanout.sh", check=True).stdout.strip()
    parent = velda.wait(parent_id, timeout=90)
    assert parent["status"] == "SUCCESS" and parent["pool"] == "shell"
    children = velda.children(parent_id)
    assert sorted(c["name"] for c in children) == [f"data/part-{i:02d}.csv" for i in range(3)]
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in children)
    assert len(list((example / "clean").iterdir())) == 3


def test_a_local_step_then_a_ray_step(velda: Velda, example: Path) -> None:
    make_data(velda, 2)
    process = velda.vbatch("-P", "shell", "--name", "process", "python", "process_data.py")
    train = velda.vbatch("-P", "gpu-1", "--name", "train", "--after-success", "process",
                         "python", "train_model.py")
    done = velda.wait(train, timeout=60)
    assert done["status"] == "SUCCESS", velda.log(train).stderr
    assert done["depends_on"] == [{"id": process, "kind": "success"}]
    assert velda.get(process)["pool"] == "shell"
    assert parse_time(done["started_at"]) >= parse_time(velda.get(process)["finished_at"])
    assert "trained on 400 points" in velda.log(train).stdout


def test_blocked_orchestrators_lend_their_cpus(velda: Velda) -> None:
    # Two cpu-2 tasks hold all four CPUs of the cluster, each waiting in a vrun for a cpu-2
    # child: without lending, nothing could ever run.
    ids = [velda.vbatch("-P", "cpu-2", "vrun", "-P", "cpu-2", "echo", f"child {i}")
           for i in range(2)]
    for i, task_id in enumerate(ids):
        assert velda.wait(task_id, timeout=60)["status"] == "SUCCESS"
        assert velda.log(task_id).stdout == f"child {i}\n"


# ---------------------------------------------------------------- what a task sees


def test_argv_cwd_env_and_gpus(velda: Velda, tmp_path: Path) -> None:
    show = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
            " 'env': dict(os.environ)}))")
    velda.env["CUDA_VISIBLE_DEVICES"] = "3"  # the submitter's own: never passed on
    try:
        gpu = velda.run("vrun", "-P", "gpu-1", "-e", "FOO=a b", "--name", "see", "python",
                        "-c", show, "two words", "", "$HOME", check=True, cwd=tmp_path)
        cpu = velda.run("vrun", "-P", "cpu-1", "python", "-c", show, check=True)
    finally:
        del velda.env["CUDA_VISIBLE_DEVICES"]
    seen = json.loads(gpu.stdout)
    assert seen["argv"] == ["two words", "", "$HOME"]
    assert seen["cwd"] == str(tmp_path)
    env = seen["env"]
    assert env["FOO"] == "a b"
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # the GPU Ray assigned
    assert (env["VELDA_TASK_NAME"], env["VELDA_POOL"], env["VELDA_ATTEMPT"]) == (
        "see", "gpu-1", "1")
    assert env["VELDA_SERVER"].startswith("http://127.0.0.1:")
    assert env["VELDA_TOKEN"] and env["VELDA_TASK_ID"]
    assert env["OMP_NUM_THREADS"] == "1"
    assert json.loads(cpu.stdout)["env"]["CUDA_VISIBLE_DEVICES"] == ""  # no GPU: none seen


def test_exit_codes_and_signals_are_recorded(velda: Velda) -> None:
    exit_codes_and_signals_are_recorded(velda)


def test_stdout_and_stderr_come_back_separately_and_exactly(velda: Velda) -> None:
    stdout_and_stderr_come_back_separately_and_exactly(velda)


def test_upload_pool_runs_in_a_copy_of_the_directory(velda: Velda, tmp_path: Path) -> None:
    (tmp_path / "input.txt").write_text("shipped\n")
    result = velda.run("vrun", "-P", "upload", "sh", "-c",
                       "cat input.txt; echo made > output.txt; pwd", check=True, cwd=tmp_path)
    text, cwd = result.stdout.split()
    assert text == "shipped" and cwd != str(tmp_path)
    assert not (tmp_path / "output.txt").exists()


def test_a_task_needing_node2_slot_runs_on_the_second_node(velda: Velda,
                                                           ray_cluster: RayCluster) -> None:
    on_node2 = velda.run("vrun", "-P", "node2", *where(), check=True)
    assert on_node2.stdout == f"{ray_cluster.node2_id}\n"
    on_head = velda.run("vrun", "-P", "gpu-1", *where(), check=True)  # the head has the GPU
    assert on_head.stdout == f"{ray_cluster.head_id}\n"


# ---------------------------------------------------------------- logs, cancel, nesting


def test_log_follow_streams_while_the_task_runs(velda: Velda, tmp_path: Path) -> None:
    gate = tmp_path / "go"
    task_id = velda.vbatch("-P", "cpu-1", "sh", "-c",
                           f"echo first; echo warn >&2; while [ ! -e {gate} ]; do sleep 0.05;"
                           " done; echo second")
    follower = subprocess.Popen(
        ["velda", "task", "log", "-f", task_id], cwd=velda.cwd, env=velda.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert follower.stdout is not None
        ready, _, _ = select.select([follower.stdout], [], [], 30)
        assert ready, "velda task log -f printed nothing while the task ran"
        assert follower.stdout.readline() == "first\n"
        assert velda.get(task_id)["status"] == "RUNNING"
        gate.touch()
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert (follower.returncode, out, err) == (0, "second\n", "warn\n")
    assert velda.get(task_id)["status"] == "SUCCESS"


def test_cancel_kills_the_process_on_its_node(velda: Velda) -> None:
    cancel_kills_the_process_on_its_node(velda)


def test_a_cancel_right_after_the_submit_stops_the_task(velda: Velda) -> None:
    a_cancel_right_after_the_submit_stops_the_task(velda, "cpu-1")


def test_vbatch_inside_a_ray_task_makes_children(velda: Velda) -> None:
    vbatch_inside_a_task_makes_children(velda)


# ---------------------------------------------------------------- failures


def test_a_dead_node_fails_its_task_as_lost_or_retries_it(velda: Velda,
                                                          ray_cluster: RayCluster) -> None:
    once = where("echo started; sleep 1000")
    again = where('if [ "$VELDA_ATTEMPT" = 1 ]; then echo started; sleep 1000; fi; echo again')
    lost = velda.vbatch("-P", "node2", *once)
    retried = velda.vbatch("-P", "node2", "--retries", "1", *again)
    for task_id in (lost, retried):
        assert wait_for_output(velda, task_id, "started") == f"{ray_cluster.node2_id}\nstarted\n"
    killed_at = time.monotonic()
    ray_cluster.kill_node2()
    task = velda.wait(lost, timeout=LOST_WITHIN_S)
    assert (task["status"], task["reason"]) == ("FAILURE", "lost")
    assert time.monotonic() - killed_at < LOST_WITHIN_S
    task = velda.wait(retried, timeout=LOST_WITHIN_S)
    assert (task["status"], task["attempt"]) == ("SUCCESS", 2)
    assert velda.log(retried).stdout == f"{ray_cluster.node2_id}\nagain\n"  # the new node2


def test_an_unreachable_cluster_is_a_clear_error(velda: Velda) -> None:
    pools = json.loads(velda.run("velda", "pool", "list", "-o", "json", check=True).stdout)
    by_name = {p["name"]: p for p in pools["pools"]}
    assert "is not reachable" in by_name["gone"]["error"]
    assert by_name["cpu-1"]["error"] is None
    table = velda.run("velda", "pool", "list", check=True).stdout
    assert "not reachable" in next(line for line in table.splitlines() if "gone" in line)
    started = time.monotonic()
    submit = velda.run("vbatch", "-P", "gone", "true")
    assert submit.returncode == 2
    assert submit.stdout == ""
    assert len(submit.stderr.splitlines()) == 1 and "is not reachable" in submit.stderr
    assert time.monotonic() - started < 5
    # the server is still up and the other pools still work
    velda.run("velda", "server", "status", check=True)
    assert velda.run("vrun", "-P", "cpu-1", "echo", "ok", check=True).stdout == "ok\n"


def test_a_ray_task_survives_a_killed_server(velda: Velda) -> None:
    task_id = velda.vbatch("-P", "cpu-1", "sh", "-c", "echo one; sleep 2; echo two")
    wait_for_output(velda, task_id, "one\n")
    velda.kill_server()  # kill -9: its driver child finishes the attempt on its own
    task = velda.wait(task_id, timeout=30)  # the next command starts a server, which adopts
    assert (task["status"], task["attempt"]) == ("SUCCESS", 1)
    assert velda.log(task_id).stdout == "one\ntwo\n"


def test_vrun_at_a_terminal_on_a_ray_node(velda: Velda) -> None:
    vrun_has_a_terminal(velda, "-P", "cpu-1")
    typed_input_reaches_a_shell_and_its_exit_code_comes_back(velda, "-P", "cpu-1")


def test_what_a_ray_task_used_is_measured_on_its_node(velda: Velda) -> None:
    task_id = velda.vbatch("-P", "cpu-1", *hog_command(velda, 200, 2))
    running = wait_for(velda, task_id, samples=2, timeout=60)
    assert running["final"] is False
    assert int(str(running["memory_bytes"])) >= 200 * MB
    task = velda.wait(task_id, timeout=60)
    assert task["status"] == "SUCCESS"
    spun = float(velda.log(task_id).stdout)
    done = task["usage"]
    assert done["final"] is True and done["peak_memory_bytes"] >= 200 * MB
    assert spun - 0.01 <= done["cpu_s"] <= spun + 2  # what it spun, plus start-up and the touch
    top = velda.run("velda", "task", "get", task_id, check=True).stdout
    assert f"usage: cpu {done['cpu_s']:.2f} s" in top
