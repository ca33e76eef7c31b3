"""Combined logs in written order, velda.toml seen and changed while the server runs, the
capacity notice said once, children counters that keep CANCELLED and SKIPPED apart, masked
environments and the pools listing: through the real commands against a real server."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ray_cluster import RayCluster
from velda.logindex import CODE
from velda.server.combined import Combined
from velda_cli import Velda, alive

ALTERNATING = "for i in 1 2 3 4; do echo out$i; sleep 0.3; echo err$i >&2; sleep 0.3; done"
WRITTEN = "".join(f"out{i}\nerr{i}\n" for i in range(1, 5))


def api(velda: Velda, path: str, method: str = "GET") -> Any:
    url = json.loads((velda.home / "server.json").read_text())["url"]
    token = (velda.home / "token").read_text().strip()
    request = urllib.request.Request(
        url + path, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def until(check: Any, timeout: float = 20) -> Any:
    """Poll check() until it returns something true (never a timed assertion: a deadline
    only so that a broken build fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"not true within {timeout:g} s"
        time.sleep(0.1)
    return value


# ---- combined logs --------------------------------------------------------------------------


def test_combined_log_is_in_the_order_written_while_running_and_after(velda: Velda) -> None:
    task = velda.vbatch("-q", "sh", "-c", ALTERNATING)
    followed = velda.log(task, "--combined", "-f").stdout  # starts while the task runs
    assert followed == WRITTEN
    assert velda.log(task, "--combined").stdout == WRITTEN
    assert velda.log(task, "--combined", "--tail", "2").stdout == "out4\nerr4\n"
    # the two streams stay apart, byte for byte
    assert velda.log(task, "--stdout").stdout == "out1\nout2\nout3\nout4\n"
    assert velda.log(task, "--stderr").stderr == "err1\nerr2\nerr3\nerr4\n"


@pytest.mark.ray
def test_combined_log_of_a_ray_task_is_in_the_order_written(
    velda: Velda, ray_cluster: RayCluster
) -> None:
    velda.configure(f'[pools.on-ray]\nengine = "ray"\naddress = "{ray_cluster.address}"\n'
                    "cpus = 1\n")
    task = velda.vbatch("-q", "-P", "on-ray", "sh", "-c", ALTERNATING)
    assert velda.wait(task, timeout=180)["status"] == "SUCCESS"
    assert velda.log(task, "--combined").stdout == WRITTEN
    assert velda.log(task, "--stdout").stdout == "out1\nout2\nout3\nout4\n"


def _attempt(tmp_path: Path, out: bytes, err: bytes, records: list[tuple[str, int]]) -> Path:
    (tmp_path / "stdout").write_bytes(out)
    (tmp_path / "stderr").write_bytes(err)
    lines = [f"{i}.000 {CODE[stream]} {end}\n" for i, (stream, end) in enumerate(records)]
    (tmp_path / "chunks").write_text("".join(lines))
    return tmp_path


def _merged(combined: Combined, to_end: bool) -> list[tuple[str, bytes]]:
    pieces = []
    while more := combined.read(to_end):
        pieces += more
    return pieces


def test_the_index_orders_pieces_and_what_it_misses_comes_last(tmp_path: Path) -> None:
    attempt = _attempt(tmp_path, b"a\nb\nc\n", b"E\nF\n", [("stdout", 2), ("stderr", 2),
                                                           ("stdout", 4)])
    running = _merged(Combined(attempt), to_end=False)
    assert running == [("stdout", b"a\n"), ("stderr", b"E\n"), ("stdout", b"b\n")]
    ended = _merged(Combined(attempt), to_end=True)
    assert b"".join(d for _, d in ended) == b"a\nE\nb\nc\nF\n"
    resumed = Combined(attempt)
    assert resumed.skip(3, to_end=True) == 0  # a reader can resume at any offset
    assert b"".join(d for _, d in _merged(resumed, True)) == b"\nb\nc\nF\n"
    assert Combined(attempt).length(to_end=False) == 6


def test_a_reader_resumes_where_an_earlier_one_stopped(tmp_path: Path) -> None:
    attempt = _attempt(tmp_path, b"a\nb\nc\n", b"E\nF\n", [("stdout", 2), ("stderr", 2),
                                                           ("stdout", 4)])
    first = Combined(attempt)
    served = sum(len(d) for _, d in _merged(first, to_end=False))
    first.remember(served)
    with open(attempt / "chunks", "a") as f:  # the task wrote on
        f.write("9.000 e 4\n")

    resumed, left = Combined.at(attempt, served, to_end=False)
    walked = Combined(attempt)
    assert left == 0 and walked.skip(served, to_end=False) == 0
    assert _merged(resumed, False) == _merged(walked, False) == [("stderr", b"F\n")]


def test_an_attempt_without_an_index_reads_stdout_then_stderr(tmp_path: Path) -> None:
    (tmp_path / "stdout").write_bytes(b"out\n")
    (tmp_path / "stderr").write_bytes(b"err\n")
    pieces = _merged(Combined(tmp_path), to_end=True)
    assert pieces == [("stdout", b"out\n"), ("stderr", b"err\n")]


# ---- config you can see and change ----------------------------------------------------------


def test_server_status_shows_the_config_file_and_its_pools(velda: Velda) -> None:
    velda.run("velda", "server", "start", check=True)
    table = velda.run("velda", "server", "status", check=True).stdout
    assert f"config: none ({velda.home / 'velda.toml'} does not exist)" in table
    velda.shutdown()

    path = velda.configure('[pools.etl]\nengine = "local"\ncpus = 2\ncapacity = 3\n')
    velda.run("velda", "server", "start", check=True)
    info = json.loads(velda.run("velda", "server", "status", "-o", "json", check=True).stdout)
    assert info["config"]["path"] == str(path)
    assert info["config"]["pools"]["etl"]["cpus"] == 2
    assert info["config"]["pools"]["etl"]["capacity"] == 3
    table = velda.run("velda", "server", "status", check=True).stdout
    assert f"config: {path}" in table
    assert "etl: local, 2 cpu, at most 3 at once" in table


def test_a_pool_added_to_velda_toml_is_used_without_a_restart(velda: Velda) -> None:
    path = velda.configure('[pools.small]\nengine = "local"\ncpus = 1\n')
    velda.run("velda", "server", "start", check=True)
    pid = velda.server_pid()
    refused = velda.run("vbatch", "-P", "etl", "true")
    assert refused.returncode != 0 and "unknown pool 'etl'" in refused.stderr

    path.write_text(path.read_text() + '[pools.etl]\nengine = "local"\ncpus = 1\n')
    task = until(lambda: submitted(velda, "-P", "etl", "true"))
    assert velda.server_pid() == pid
    assert velda.wait(task)["status"] == "SUCCESS"


def submitted(velda: Velda, *argv: str) -> str | None:
    """The task's ID, or None when vbatch refused it."""
    result = velda.run("vbatch", "-q", *argv)
    return result.stdout.strip() if result.returncode == 0 else None


def test_a_broken_velda_toml_is_refused_with_its_line_and_the_old_pools_stay(
    velda: Velda,
) -> None:
    path = velda.configure('[pools.etl]\nengine = "local"\ncpus = 1\n')
    velda.run("velda", "server", "start", check=True)
    path.write_text('[pools.etl]\nengine = "local"\ncpus = \n')

    reload = velda.run("velda", "server", "reload")
    assert reload.returncode != 0
    assert "line 3" in reload.stderr and "the pools read before stay in force" in reload.stderr
    info = json.loads(velda.run("velda", "server", "status", "-o", "json", check=True).stdout)
    assert "line 3" in info["config"]["error"]
    assert "etl" in info["config"]["pools"]
    task = velda.vbatch("-q", "-P", "etl", "true")
    assert velda.wait(task)["status"] == "SUCCESS"
    assert "line 3" in (velda.home / "server.log").read_text()

    path.write_text('[pools.etl]\nengine = "local"\ncpus = 1\n[pools.more]\ncpus = 1\n')
    fixed = velda.run("velda", "server", "reload", check=True)
    assert "pools etl, more" in fixed.stdout


def test_a_gpu_pool_that_cannot_fit_says_which_lines_to_write_where(velda: Velda) -> None:
    path = velda.configure("[local]\ngpus = 0\n")  # as on a machine without GPUs
    refused = velda.run("vbatch", "-P", "gpu-1", "true")
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1
    assert '[pools.gpu-1]\\nengine = "local"\\ncpus = 1' in refused.stderr
    assert str(path) in refused.stderr

    fix = refused.stderr.split("instead: ", 1)[1].split(" (the server", 1)[0]
    velda.sh(fix, check=True)  # what the message says, and no restart
    assert '[pools.gpu-1]\nengine = "local"\ncpus = 1\n' in path.read_text()
    task = until(lambda: submitted(velda, "-P", "gpu-1", "true"))
    assert velda.wait(task)["status"] == "SUCCESS"


def test_restart_keeps_a_running_task_running_and_records_its_exit(velda: Velda) -> None:
    go = velda.cwd / "go"
    script = f"echo before; while [ ! -e {go} ]; do sleep 0.05; done; echo after >&2; exit 3"
    task = velda.vbatch("-q", "sh", "-c", script)
    velda.wait(task, until={"RUNNING"})
    old = velda.server_pid()
    assert old is not None

    velda.run("velda", "server", "restart", check=True)
    new = velda.server_pid()
    assert new is not None and new != old and not alive(old)
    assert velda.get(task)["status"] == "RUNNING"
    go.touch()
    done = velda.wait(task)
    assert (done["status"], done["exit_code"]) == ("FAILURE", 3)
    assert velda.log(task, "--combined").stdout == "before\nafter\n"


# ---- one notice ------------------------------------------------------------------------------


def test_the_capacity_notice_is_said_once_and_never_into_a_task_log(velda: Velda) -> None:
    big = f"cpu-{4 * len(os.sched_getaffinity(0))}"
    top = velda.sh(f"vbatch -P {big} true; vbatch -P {big} true", check=True)
    assert top.stderr.count(f"notice: pool {big} asks for") == 1

    fan_out = f"for i in 1 2 3; do vbatch -P {big} true; done"
    parent = velda.vbatch("-q", "sh", "-c", fan_out)
    assert velda.wait(parent, timeout=120)["status"] == "SUCCESS"
    assert "notice" not in velda.log(parent, "--stderr").stderr
    assert len(velda.children(parent)) == 3


# ---- counters, masked environment, pools -----------------------------------------------------


def test_children_counters_keep_cancelled_and_skipped_apart_from_failed(velda: Velda) -> None:
    script = ("vbatch -n ok true; vbatch -n bad false; vbatch -n skipped --after-fail ok true; "
              "vbatch -n stuck sleep 300")
    parent = velda.vbatch("-q", "-n", "p", "sh", "-c", script)
    for name in ("ok", "bad", "skipped"):
        velda.wait(f"p/{name}")
    velda.wait("p/stuck", until={"RUNNING"})
    velda.run("velda", "task", "cancel", "p/stuck", check=True)

    done = velda.wait(parent)
    assert done["status"] == "FAILURE"
    assert done["children"] == {
        "total": 4, "succeeded": 1, "failed": 1, "cancelled": 1, "skipped": 1,
        "running": 0, "queued": 0,
    }
    watch = velda.run("velda", "task", "watch", "p").stdout
    assert "4/4 done: 1 succeeded, 1 failed, 1 cancelled, 1 skipped, 0 running, 0 queued" in watch


def test_get_masks_secret_values_and_show_env_is_for_the_server_token(velda: Velda) -> None:
    env = {"API_TOKEN": "s3cret", "DB_URL": "postgres://bob:hunter2@db/x", "PLAIN": "seen"}
    inner = 'velda task get "$VELDA_TASK_ID" --show-env -o json'
    task = velda.run("vbatch", "-q", "sh", "-c", inner, env=env, check=True).stdout.strip()
    done = velda.wait(task)

    masked = velda.get(task)["env"]
    assert masked["API_TOKEN"] == "********"
    assert masked["DB_URL"] == "postgres://bob:********@db/x"
    assert masked["PLAIN"] == "seen"
    shown = velda.run("velda", "task", "get", task, "--show-env", "-o", "json", check=True)
    assert json.loads(shown.stdout)["env"]["API_TOKEN"] == "s3cret"

    assert done["status"] == "FAILURE"  # the task's own token may not unmask
    assert "only the server token" in velda.log(task, "--stderr").stderr


def test_pools_lists_built_in_configured_and_used_pools_and_the_machine(velda: Velda) -> None:
    velda.configure('[pools.etl]\nengine = "local"\ncpus = 1\n')
    go = velda.cwd / "go"
    wait_for_go = f"while [ ! -e {go} ]; do sleep 0.05; done"
    task = velda.vbatch("-q", "-P", "cpu-1", "sh", "-c", wait_for_go)
    velda.wait(task, until={"RUNNING"})

    data = api(velda, "/api/v1/pools")
    by_name = {p["name"]: p for p in data["pools"]}
    assert {"shell", "etl", "cpu-1"} <= set(by_name)
    assert by_name["etl"]["configured"] and not by_name["shell"]["configured"]
    assert by_name["cpu-1"]["running"] == 1
    machine = data["machine"]
    assert machine["cpus"] == len(os.sched_getaffinity(0))
    assert machine["cpus_used"] == 1 and machine["cpus_free"] == machine["cpus"] - 1
    assert machine["gpus_used"] + machine["gpus_free"] == machine["gpus"]
    table = velda.run("velda", "pool", "list", check=True).stdout
    assert f"this machine: 1 of {machine['cpus']:g} CPUs in use" in table
    go.touch()
    velda.wait(task)
