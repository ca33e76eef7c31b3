"""Slurm pools end to end: the real server and commands, pools served by the real two-node
Slurm cluster of slurm_cluster.py (SPEC §4.6, §4.7, §5, §10).

One server serves the whole module. It and every command run inside the cluster's network
namespace (`Velda.prefix`), so the jobs on the Slurm nodes reach the server at its loopback URL.
Its velda.toml maps the example pipelines' pools gpu-1, cpu-1, cpu-2 and the default pool to
Slurm, adds pools pinned to each node, a pool that takes a whole node, and one whose slurm.conf
names a controller that is not there. `shell` stays local, so pipelines mix local and Slurm
tasks.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from forwarding import check_forward, serve
from pipelines import (
    assert_recursive_succeeded,
    examples_as_cwd,
    make_data,
    parse_time,
    run_linear,
)
from pty_session import (
    a_terminal_task_survives_a_killed_server,
    a_window_resize_reaches_the_task,
    typed_input_reaches_a_shell_and_its_exit_code_comes_back,
    vrun_has_a_terminal,
)
from remote_pools import (
    a_cancel_right_after_the_submit_stops_the_task,
    cancel_kills_the_process_on_its_node,
    exit_codes_and_signals_are_recorded,
    explain,
    stdout_and_stderr_come_back_separately_and_exactly,
    vbatch_inside_a_task_makes_children,
    wait_for_output,
)
from slurm_cluster import NODES, SlurmCluster
from velda_cli import Velda, cancel_open_tasks, free_port

pytestmark = pytest.mark.slurm

LOST_WITHIN_S = 60  # SPEC §10
NODE_CPUS = 4  # per node, as slurm_cluster.py declares them


def slurm_pool(name: str, extra: str = "", cpus: int = 1) -> str:
    return f'[pools.{name}]\nengine = "slurm"\npartition = "debug"\ncpus = {cpus}\n{extra}\n'


def config(no_controller_conf: Path) -> str:
    pinned = "".join(slurm_pool(f"on-{node}", f'sbatch_args = ["--nodelist={node}"]')
                     for node in NODES)
    return ('default_pool = "batch"\n\n'
            + slurm_pool("batch") + slurm_pool("cpu-1") + slurm_pool("cpu-2", cpus=2)
            + slurm_pool("gpu-1", "gpus = 1") + slurm_pool("whole-node", cpus=NODE_CPUS)
            + pinned + slurm_pool("no-controller", f'slurm_conf = "{no_controller_conf}"'))


def conf_without_controller(slurm: SlurmCluster, dest: Path) -> Path:
    """A copy of the cluster's slurm.conf whose SlurmctldPort nothing listens on. Its clients
    give up at once instead of retrying for MessageTimeout (5 s) on every call."""
    text = Path(slurm.env["SLURM_CONF"]).read_text()
    assert "MessageTimeout=5\n" in text
    text = text.replace("MessageTimeout=5\n", "MessageTimeout=1\n")
    dest.write_text(f"{text}SlurmctldPort={free_port()}\n")
    return dest


@pytest.fixture(scope="module")
def velda(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Velda]:
    root = tmp_path_factory.mktemp("slurm-pools")
    v = Velda(root / "home", root / "work", prefix=slurm.prefix)
    v.env["SLURM_CONF"] = slurm.env["SLURM_CONF"]
    v.configure(config(conf_without_controller(slurm, root / "no-controller.conf")))
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


def slurm_jobs(slurm: SlurmCluster) -> dict[str, list[str]]:
    """Job name -> the states of its jobs, for every job slurmctld remembers (MinJobAge)."""
    result = subprocess.run([*slurm.prefix, "scontrol", "show", "job", "-o"], env=slurm.env,
                            capture_output=True, text=True, check=True, timeout=30)
    jobs: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        name, state = re.search(r"JobName=(\S+)", line), re.search(r"JobState=(\S+)", line)
        if name and state:
            jobs.setdefault(name.group(1), []).append(state.group(1))
    return jobs


def assert_ran_as_slurm_jobs(slurm: SlurmCluster, *tasks: dict[str, object]) -> None:
    """Each task's attempt was a Slurm job named after it, and that job completed."""
    jobs = slurm_jobs(slurm)
    for task in tasks:
        name = f"velda-{task['id']}.{task['attempt']}"
        assert jobs.get(name) == ["COMPLETED"], f"task {task['id']}: Slurm has {jobs.get(name)}"


# ---------------------------------------------------------------- the example pipelines


def test_linear_pipeline_runs_on_slurm(velda: Velda, example: Path,
                                       slurm: SlurmCluster) -> None:
    assert_ran_as_slurm_jobs(slurm, *run_linear(velda, example, timeout=90))


def test_fanout_runs_parent_and_children_on_slurm(velda: Velda, example: Path,
                                                  slurm: SlurmCluster) -> None:
    make_data(velda, 3)
    parent_id = velda.run("./fanout.sh", check=True).stdout.strip()
    parent = velda.wait(parent_id, timeout=90)
    assert parent["status"] == "SUCCESS", explain(velda, parent_id)
    assert parent["pool"] == "batch"  # the default pool
    children = velda.children(parent_id)
    assert sorted(c["name"] for c in children) == [f"data/part-{i:02d}.csv" for i in range(3)]
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in children)
    assert parent["children"]["succeeded"] == 3
    assert len(list((example / "clean").iterdir())) == 3
    first = velda.log(f"{parent_id}/data/part-00.csv")
    assert first.stdout == "part-00.csv: kept 200, dropped 1\n"
    assert first.stderr == "part-00.csv: dropped 1 bad rows\n"
    assert_ran_as_slurm_jobs(slurm, parent, *children)


def run_pipeline(velda: Velda, files: int) -> list[str]:
    """pipeline.sh to its end: preprocess (fanning out from its Slurm job), train, eval."""
    make_data(velda, files)
    ids = velda.run("./pipeline.sh", check=True).stdout.split()
    assert velda.wait(ids[2], timeout=120)["status"] == "SUCCESS", explain(velda, ids[0])
    return ids


def test_pipeline_fans_out_from_inside_a_slurm_job(velda: Velda, example: Path,
                                                   slurm: SlurmCluster) -> None:
    preprocess_id, train_id, eval_id = run_pipeline(velda, 4)
    preprocess, train = velda.get(preprocess_id), velda.get(train_id)
    grandchildren = velda.children(preprocess_id)
    assert len(grandchildren) == 4
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in grandchildren)
    assert preprocess["children"]["succeeded"] == 4
    latest = max(parse_time(c["resolved_at"]) for c in grandchildren)
    assert parse_time(train["started_at"]) >= max(latest, parse_time(preprocess["resolved_at"]))
    assert "evaluation passed" in velda.log(eval_id).stdout
    assert_ran_as_slurm_jobs(slurm, preprocess, train, *grandchildren)


def test_recursive_two_levels_on_slurm(velda: Velda, example: Path) -> None:
    # root and one task per file wait in a vrun, each holding a Slurm CPU: 5 of the 8
    run_pipeline(velda, 4)
    root_id = velda.run("./recursive.sh", check=True).stdout.strip()
    root = velda.wait(root_id, timeout=120)
    assert root["status"] == "SUCCESS", explain(velda, root_id)
    for inference, evaluation in assert_recursive_succeeded(velda, root_id, example, files=4):
        assert (inference["pool"], evaluation["pool"]) == ("gpu-1", "cpu-1")


# ---------------------------------------------------------------- what a task sees


def test_a_slurm_task_gets_its_cpu_totals(velda: Velda) -> None:
    # CPU seconds, not wall time: a busy machine cannot make it use less
    spin = "import time\nwhile time.process_time() < 1.5: pass"
    task_id = velda.vbatch("-P", "cpu-1", "python3", "-c", spin)
    usage = velda.wait(task_id)["usage"]
    assert usage["final"] is True and usage["samples"] == 0  # nothing sampled on the node
    assert 1.2 <= usage["cpu_s"] < 5, usage


def test_a_slurm_task_starts_when_its_command_starts_on_the_node(velda: Velda) -> None:
    task = velda.wait(velda.vbatch("-P", "cpu-1", "sleep", "1"))
    wrapper_started = (velda.home / "logs" / f"{task['id']}.1" / "pid").stat().st_mtime
    started, created = parse_time(task["started_at"]), parse_time(task["created_at"])
    assert created <= started and abs(started - wrapper_started) < 0.002, task


def test_a_task_runs_as_a_slurm_job(velda: Velda) -> None:
    seen = velda.run("vrun", "-P", "cpu-1", "--name", "where", "sh", "-c",
                     "echo $SLURM_JOB_ID $SLURM_JOB_NAME $SLURM_JOB_PARTITION $SLURMD_NODENAME",
                     check=True).stdout.split()
    task = velda.get("where")
    assert seen[0].isdigit()
    assert seen[1:3] == [f"velda-{task['id']}.1", "debug"]
    assert seen[3] in NODES


def test_exit_codes_and_signals_are_recorded(velda: Velda) -> None:
    exit_codes_and_signals_are_recorded(velda)


def test_stdout_and_stderr_come_back_separately_and_exactly(velda: Velda) -> None:
    stdout_and_stderr_come_back_separately_and_exactly(velda)


def test_shards_are_one_job_array(velda: Velda) -> None:
    parent_id = velda.vbatch("-N", "3", "-P", "cpu-1", "sh", "-c",
                             "echo $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $VELDA_SHARD_ID"
                             " $VELDA_TOTAL_SHARDS")
    parent = velda.wait(parent_id, timeout=60)
    assert parent["status"] == "SUCCESS", explain(velda, parent_id)
    shards = sorted(velda.children(parent_id), key=lambda c: int(c["name"]))
    assert [s["name"] for s in shards] == ["0", "1", "2"]
    printed = [velda.log(s["id"]).stdout.split() for s in shards]
    array_ids = {array_id for array_id, *_ in printed}
    assert len(array_ids) == 1 and array_ids.pop().isdigit()  # one job array for all three
    assert [rest for _, *rest in printed] == [[str(i), str(i), "3"] for i in range(3)]


def test_a_gpu_pool_sees_its_device_not_the_submitters(velda: Velda) -> None:
    show = "echo ${CUDA_VISIBLE_DEVICES-unset}"
    velda.env["CUDA_VISIBLE_DEVICES"] = "3"  # the submitter's own: never passed on
    try:
        gpu = velda.run("vrun", "-P", "gpu-1", "sh", "-c", show, check=True)
        cpu = velda.run("vrun", "-P", "cpu-1", "sh", "-c", show, check=True)
    finally:
        del velda.env["CUDA_VISIBLE_DEVICES"]
    assert gpu.stdout == "0\n"  # the gres Slurm gave it
    assert cpu.stdout in ("unset\n", "\n")  # no GPU: none seen


# ---------------------------------------------------------------- a terminal, forwarded ports


def test_vrun_at_a_terminal_gives_a_slurm_task_one(velda: Velda) -> None:
    vrun_has_a_terminal(velda, "-P", "cpu-1")
    typed_input_reaches_a_shell_and_its_exit_code_comes_back(velda, "-P", "cpu-1")


def test_a_window_resize_reaches_a_slurm_task(velda: Velda) -> None:
    a_window_resize_reaches_the_task(velda, "-P", "cpu-1")


def test_a_slurm_task_keeps_its_terminal_through_a_killed_server(velda: Velda) -> None:
    a_terminal_task_survives_a_killed_server(velda, "-P", "cpu-1")


def test_a_slurm_task_serving_http_is_reachable_through_port_forward(velda: Velda) -> None:
    port = free_port()
    task_id = serve(velda, port, "-P", "cpu-1", bind="0.0.0.0")
    check_forward(velda, task_id, port)
    velda.run("velda", "task", "cancel", task_id, check=True)


# ---------------------------------------------------------------- cancel, nesting, mixing


def test_cancel_kills_the_job_on_its_node(velda: Velda) -> None:
    cancel_kills_the_process_on_its_node(velda)


def test_a_cancel_right_after_the_submit_stops_the_task(velda: Velda) -> None:
    """The cancel comes while sbatch runs."""
    a_cancel_right_after_the_submit_stops_the_task(velda, "cpu-1")


def test_vbatch_inside_a_slurm_job_makes_children(velda: Velda) -> None:
    vbatch_inside_a_task_makes_children(velda)


def test_a_local_step_then_a_slurm_step(velda: Velda, example: Path) -> None:
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


def test_a_local_parent_fans_out_to_slurm_children(velda: Velda, example: Path) -> None:
    make_data(velda, 3)
    parent_id = velda.vbatch("-P", "shell", "bash", "-c",
                             "ls data/*.csv | xargs -I {} vbatch --name {} -P cpu-1"
                             " python process_file.py {}")
    parent = velda.wait(parent_id, timeout=60)
    assert parent["status"] == "SUCCESS", explain(velda, parent_id)
    children = velda.children(parent_id)
    assert sorted(c["name"] for c in children) == [f"data/part-{i:02d}.csv" for i in range(3)]
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in children)
    assert len(list((example / "clean").iterdir())) == 3


# ---------------------------------------------------------------- failures


def node_of(velda: Velda, task_id: str) -> str:
    return wait_for_output(velda, task_id, "started").split()[0]


def test_a_dead_node_fails_its_task_as_lost_or_retries_it(velda: Velda,
                                                          slurm: SlurmCluster) -> None:
    retried = velda.vbatch("-P", "cpu-1", "--retries", "1", "sh", "-c",
                           'echo $SLURMD_NODENAME; if [ "$VELDA_ATTEMPT" = 1 ]; then'
                           " echo started; sleep 1000; fi; echo again")
    node = node_of(velda, retried)
    lost = velda.vbatch("-P", f"on-{node}", "sh", "-c",
                        "echo $SLURMD_NODENAME; echo started; sleep 1000")
    assert node_of(velda, lost) == node
    killed_at = time.monotonic()
    slurm.kill_node(node)
    try:
        task = velda.wait(lost, timeout=LOST_WITHIN_S)
        assert (task["status"], task["reason"]) == ("FAILURE", "lost")
        task = velda.wait(retried, timeout=LOST_WITHIN_S)
        assert (task["status"], task["attempt"]) == ("SUCCESS", 2)
        assert time.monotonic() - killed_at < LOST_WITHIN_S
        other = next(n for n in NODES if n != node)
        assert velda.log(retried).stdout == f"{other}\nagain\n"
    finally:
        slurm.restart_node(node)


def test_jobs_queued_and_running_survive_a_killed_server(velda: Velda, tmp_path: Path) -> None:
    # whole-node tasks: two run (one per node), two wait in Slurm's queue
    ran = tmp_path / "ran"
    ids = [velda.vbatch("-P", "whole-node", "sh", "-c",
                        f'sleep 2; echo "$VELDA_TASK_ID" >> {ran}; exit {code}')
           for code in range(4)]
    for task_id in ids[:2]:
        velda.wait(task_id, until={"RUNNING"}, timeout=30)
    assert [velda.get(task_id)["status"] for task_id in ids[2:]] == ["QUEUED"] * 2
    velda.kill_server()
    tasks = [velda.wait(task_id, timeout=60) for task_id in ids]  # a new server adopts them
    assert [(t["exit_code"], t["attempt"]) for t in tasks] == [(code, 1) for code in range(4)]
    assert [t["status"] for t in tasks] == ["SUCCESS"] + ["FAILURE"] * 3
    assert sorted(ran.read_text().split()) == sorted(ids)  # each ran once


def test_pool_list_shows_the_partitions_nodes_and_what_is_allocated(velda: Velda) -> None:
    task_id = velda.vbatch("-P", "whole-node", "sleep", "60")
    velda.wait(task_id, until={"RUNNING"}, timeout=30)

    def nodes() -> list[dict[str, object]]:
        listed = json.loads(velda.run("velda", "pool", "list", "-o", "json", check=True).stdout)
        return next(p for p in listed["pools"] if p["name"] == "whole-node")["nodes"]

    deadline = time.monotonic() + 15  # sinfo's answer is kept for a moment
    while not any(n["cpus_allocated"] == NODE_CPUS for n in nodes()):
        assert time.monotonic() < deadline, nodes()
        time.sleep(0.5)
    assert sorted(n["name"] for n in nodes()) == list(NODES)
    assert all((n["cpus"], n["gpus"]) == (NODE_CPUS, 1) for n in nodes())
    table = velda.run("velda", "pool", "list", check=True).stdout
    assert f"pool whole-node: {len(NODES)} nodes" in table
    assert re.search(rf"^n[12] .*{NODE_CPUS}/{NODE_CPUS} allocated", table, re.M), table
    velda.run("velda", "task", "cancel", task_id, check=True)
    assert velda.wait(task_id)["status"] == "CANCELLED"


def test_an_unreachable_slurmctld_is_a_clear_error(velda: Velda) -> None:
    pools = json.loads(velda.run("velda", "pool", "list", "-o", "json", check=True).stdout)
    by_name = {p["name"]: p for p in pools["pools"]}
    assert "slurmctld" in by_name["no-controller"]["error"]
    assert by_name["cpu-1"]["error"] is None
    table = velda.run("velda", "pool", "list", check=True).stdout
    assert "slurmctld" in next(line for line in table.splitlines()
                               if line.startswith("no-controller"))
    submit = velda.run("vbatch", "-P", "no-controller", "true")
    assert (submit.returncode, submit.stdout) == (2, "")
    assert len(submit.stderr.splitlines()) == 1 and "slurmctld" in submit.stderr, submit.stderr
    # the server is still up and the other pools still work
    assert velda.run("vrun", "-P", "cpu-1", "echo", "ok", check=True).stdout == "ok\n"
