"""vrun and vbatch -f: live output, exit codes and Ctrl-C (SPEC §3.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from velda_cli import Velda, default_signals


@pytest.mark.parametrize(
    ("script", "code"),
    [("exit 0", 0), ("exit 3", 3), ("kill -TERM $$", 143), ("kill -KILL $$", 137)],
)
def test_vrun_exits_with_the_task_code(velda: Velda, script: str, code: int) -> None:
    result = velda.run("vrun", "sh", "-c", f"echo out; echo err >&2; {script}")
    assert result.returncode == code
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_vrun_records_the_task_like_any_other(velda: Velda) -> None:
    velda.run("vrun", "--name", "recorded", "-l", "kind=demo", "sh", "-c", "exit 5")
    task = velda.get("recorded")
    assert (task["status"], task["exit_code"], task["reason"]) == ("FAILURE", 5, "exit")
    assert task["labels"]["kind"] == "demo"
    killed = velda.run("vrun", "--name", "killed", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 137
    task = velda.get("killed")
    assert (task["signal"], task["reason"], task["exit_code"]) == (9, "signal", None)
    assert killed.stderr == ""  # nothing added to the task's own output


def test_vrun_exits_125_when_the_task_never_ran(velda: Velda) -> None:
    velda.run("vrun", "--name", "bad", "false")
    result = velda.run("vrun", "--after-success", "bad", "echo", "never")
    assert result.returncode == 125
    assert result.stdout == ""
    assert "FAILED_UPSTREAM" in result.stderr
    assert velda.run("vrun", "-q", "--after-fail", "bad", "true").returncode == 0


def test_bad_usage_exits_2_with_one_line(velda: Velda) -> None:
    for argv in (
        ["vrun"],
        ["vrun", "-P", "nosuchpool", "true"],
        ["vbatch", "--timeout", "soon", "true"],
        ["vbatch", "-n", "", "true"],
        ["vrun", "-P", "gpu-64", "true"],
    ):
        result = velda.run(*argv)
        assert result.returncode == 2, argv
        assert result.stdout == ""
    unknown = velda.run("vrun", "-P", "nosuchpool", "true").stderr
    assert unknown == "vrun: unknown pool 'nosuchpool'; pools: shell, cpu-N, gpu-N\n"
    gpu = velda.run("vrun", "-P", "gpu-64", "true").stderr
    assert gpu.startswith("vrun: pool gpu-64 needs 64 GPU(s) per task; this machine has")
    assert len(gpu.splitlines()) == 1


def test_unreachable_server_exits_1(velda: Velda) -> None:
    nowhere = {"VELDA_SERVER": "http://127.0.0.1:9", "VELDA_TOKEN": "x", "VELDA_RETRY_S": "0"}
    result = velda.run("vrun", "true", env=nowhere)
    assert result.returncode == 1
    assert result.stderr.startswith("vrun: cannot reach the velda server at http://127.0.0.1:9")
    assert len(result.stderr.splitlines()) == 1


def test_vrun_streams_output_while_the_task_runs(velda: Velda, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second"
    proc = subprocess.Popen(
        ["vrun", "--name", "live", "sh", "-c", script], env=velda.env, cwd=velda.cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "first\n"  # before the task can end: the gate is shut
    assert velda.get("live")["status"] == "RUNNING"
    gate.touch()
    assert proc.stdout.read() == "second\n"
    assert proc.wait(30) == 0


def _start_vrun(velda: Velda, script: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["vrun", "--name", "interrupted", "sh", "-c", script], env=velda.env, cwd=velda.cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_ctrl_c_sends_sigint_to_the_task(velda: Velda) -> None:
    proc = _start_vrun(velda, "trap 'echo got INT; exit 7' INT; echo ready; "
                       "while true; do sleep 0.05; done")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out == "got INT\n"
    assert proc.returncode == 7


def test_second_ctrl_c_cancels_the_task(velda: Velda) -> None:
    proc = _start_vrun(velda, "trap '' INT; echo ready; while true; do sleep 0.05; done")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    task = velda.get("interrupted")
    assert task["status"] == "CANCELLED"
    assert task["reason"] == "cancelled"
    assert proc.returncode == 128 + task["signal"]


def test_vbatch_follow_streams_and_exits_with_the_code(velda: Velda) -> None:
    result = velda.run("vbatch", "-f", "sh", "-c", "echo hi; echo oops >&2; exit 9")
    assert result.returncode == 9
    task_id, output = result.stdout.split("\n", 1)
    assert output == "hi\n"
    assert "oops\n" in result.stderr
    assert f"task {task_id}: RUNNING" in result.stderr
    assert f"task {task_id}: FAILURE (exit, exit 9)" in result.stderr
    quiet = velda.run("vbatch", "-f", "-q", "sh", "-c", "echo hi; echo oops >&2")
    assert quiet.returncode == 0
    assert quiet.stderr == "oops\n"


def test_vbatch_prints_only_the_id_and_the_url_on_stderr(velda: Velda) -> None:
    result = velda.run("vbatch", "true", check=True)
    task_id = result.stdout.strip()
    assert result.stdout == f"{task_id}\n" and task_id.isdigit()
    assert result.stderr.strip().endswith(f"/tasks/{task_id}")
    assert velda.run("vbatch", "-q", "true", check=True).stderr == ""


def test_options_stop_at_the_first_word_of_the_command(velda: Velda) -> None:
    result = velda.run("vrun", "-q", "python3", "-c", "import sys; print(sys.argv[1:])",
                       "--name", "x", "-P", "y", check=True)
    assert result.stdout == "['--name', 'x', '-P', 'y']\n"


def test_a_cpu_pool_larger_than_the_machine_runs_alone_with_a_notice(velda: Velda) -> None:
    result = velda.run("vrun", "-P", "cpu-64", "sh", "-c", "echo $OMP_NUM_THREADS")
    assert result.returncode == 0
    assert "vrun: notice: pool cpu-64 asks for 64 CPUs and this machine has" in result.stderr
    assert int(result.stdout) == len(os.sched_getaffinity(0))  # all of the machine
