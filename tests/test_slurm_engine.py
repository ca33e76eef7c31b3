"""SlurmEngine against a real two-node Slurm cluster on loopback (see slurm_cluster.py): what
only the Slurm engine does (Slurm's own variables, job arrays, GPUs by gres, adoption by job
name, heartbeats, what slurmctld refuses). What every engine does is in
test_engine_contract.py.

The tests drive the engine directly, as the server does (engine_harness.py). The engine finds
the Slurm commands on PATH, as on any cluster: here they are small scripts that run the real
ones inside the cluster's network namespace, so velda does not know about the namespace. One
engine serves the whole module; each test uses its own task IDs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_harness import Harness, Recorder, slurm_harness
from slurm_cluster import SlurmCluster
from velda.engines.base import EngineError, Launch
from velda.engines.slurm import SlurmEngine
from velda.engines.status_file import read_int
from velda.engines.terminal_host import read_published
from velda.models import Exit, Reason, Resources
from velda_cli import alive

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def harness(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    bin_dir = tmp_path_factory.mktemp("slurm-bin")
    slurm.write_clients(bin_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        with slurm_harness() as h:
            yield h


def wait_ready(harness: Harness, launch: Launch) -> None:
    """Until the command runs and printed its first line, "ready"."""
    harness.wait_running(launch)
    harness.wait(lambda: launch.stdout_path.exists()
                 and launch.stdout_path.read_text() == "ready\n", 10, "ready")


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def test_the_job_has_its_own_slurm_variables_not_the_submitters(harness: Harness,
                                                                 tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh('echo "$SLURM_JOB_ID" "$SLURM_JOB_NAME"'),
                            env={"SLURM_JOB_ID": "from-the-submitter"})
    handle = harness.start(launch)
    assert harness.wait_exit(launch) == Exit(0)
    assert launch.stdout_path.read_text() == f"{handle['job']} velda-{launch.task_id}.1\n"


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


def test_adopt_finds_a_running_job_by_name(harness: Harness, tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh("echo ready; exec sleep 60"))
    harness.start(launch)
    wait_ready(harness, launch)
    restarted = harness.with_options()
    try:
        restarted.run(restarted.engine.adopt(launch.task_id, 1, {}, launch))  # no handle kept
        handle = restarted.wait_running(launch)
        assert handle["job"] == harness.events.started[(launch.task_id, 1)]["job"]
        restarted.run(restarted.engine.cancel(handle, 5))
        assert restarted.wait_exit(launch).signal == signal.SIGTERM
    finally:
        restarted.close()


def test_check_names_slurmctld_when_it_is_unreachable(harness: Harness, slurm: SlurmCluster,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    slurm.write_clients(tmp_path / "bin", namespaced=False)  # no slurmctld out here
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    pool = harness.pool()
    with pytest.raises(EngineError, match="slurmctld is not reachable"):
        harness.run(SlurmEngine(pool, Recorder()).check(pool))


def test_check_names_a_partition_that_does_not_exist(harness: Harness) -> None:
    pool = harness.pool(partition="gpu")
    with pytest.raises(EngineError, match="no partition 'gpu' .*debug"):
        harness.run(harness.engine.check(pool))


def test_a_job_whose_heartbeat_stops_ends_lost(harness: Harness, tmp_path: Path) -> None:
    quick = harness.with_options(node_timeout=2)
    launch = quick.launch(tmp_path, sh("echo ready; exec sleep 60"))
    try:
        handle = quick.start(launch)
        wait_ready(quick, launch)
        wrapper = read_int(launch.attempt_dir / "pid")
        beat = launch.attempt_dir / "heartbeat"
        while not beat.is_dir():  # the node can no longer write it, as on a dead node
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                beat.unlink()
                beat.mkdir()
        exit = quick.wait_exit(launch, timeout_s=15)
        assert exit.reason == Reason.LOST and "heartbeat" in (exit.detail or ""), exit
        assert wrapper is not None and handle["job"]
        quick.wait(lambda: not alive(wrapper), 10, "the job scancelled")
    finally:
        quick.close()


def test_cancel_of_a_pending_job_ends_it_before_it_runs(harness: Harness,
                                                        tmp_path: Path) -> None:
    launch = harness.launch(tmp_path, sh("echo ran"), sbatch_args=["--begin=now+60"])
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


def test_a_job_under_a_terminal_runs_on_it_and_names_its_node(harness: Harness,
                                                               tmp_path: Path) -> None:
    # Typing into it needs the server in the cluster's network namespace, where the keeper's
    # port is: test_slurm_pools.py does that through vrun.
    launch = dataclasses.replace(
        harness.launch(tmp_path, sh("tty; stty size; sleep 2; exit 5")), terminal=(24, 80))
    harness.start(launch)
    handle = harness.wait_running(launch)
    assert harness.engine.host_of(handle) == "127.0.0.1"  # the nodes' NodeAddr
    harness.wait(lambda: read_published(launch.attempt_dir) is not None, 10, "published")
    port, token = read_published(launch.attempt_dir) or (0, "")
    assert port > 0 and len(token) == 32
    assert (launch.attempt_dir / "terminal.json").stat().st_mode & 0o777 == 0o600
    assert harness.wait_exit(launch).exit_code == 5
    session = launch.stdout_path.read_bytes()  # all of it, before the exit
    assert session.startswith(b"/dev/pts/") and session.endswith(b"\r\n24 80\r\n"), session
    assert read_published(launch.attempt_dir) is None  # its keeper has ended


def test_a_terminal_without_python3_on_the_node_fails_in_words(harness: Harness,
                                                               tmp_path: Path) -> None:
    launch = dataclasses.replace(
        harness.launch(tmp_path, ["true"], env={"PATH": str(tmp_path / "nothing")}),
        terminal=(24, 80))
    assert harness.run_to_end(launch).exit_code == 127
    assert "python3" in launch.stderr_path.read_text()
