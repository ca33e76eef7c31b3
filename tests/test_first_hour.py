"""What a newcomer meets in the first hour: the test command on a fresh machine, signals sent
to vrun, live output, and messages that say what to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_cluster import RayCluster
from test_terminal import Terminal
from velda_cli import Velda, default_signals, wait_gone


def ignored_signals(pid: int) -> set[int]:
    """The signals process pid ignores, from the SigIgn mask of /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


def started_in_the_background(velda: Velda, *argv: str) -> subprocess.Popen[str]:
    """argv as `cmd &` runs it from a script: with SIGINT and SIGQUIT ignored."""
    def ignore_as_a_script_does() -> None:
        default_signals()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)

    return subprocess.Popen(
        list(argv), env=velda.env, cwd=velda.cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=ignore_as_a_script_does,
    )


# ------------------------------------------------------------------ a fresh machine


@pytest.mark.ray
def test_the_ray_cluster_uses_a_temp_root_of_its_own(ray_cluster: RayCluster) -> None:
    # Ray writes its address file under its default temp root, /tmp/ray or $TMPDIR/ray, which
    # exists only where Ray ran before; the fixture gives every start a new root instead.
    root = Path(ray_cluster.root)
    assert root.parent == Path("/tmp") and root.name.startswith("vray-")
    assert (root / "ray" / "ray_current_cluster").read_text().strip() == ray_cluster.address
    assert root.stat().st_mtime > time.time() - 3600 * 24  # made by this run


FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../../calls"
if [ "$1" = -VV ]; then echo "Python 3.11 (fake)"; fi
"""


def test_a_second_run_of_the_test_command_does_not_reinstall(tmp_path: Path) -> None:
    root = Path(__file__).parents[1]
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text((root / "scripts" / "test.sh").read_text())
    (tmp_path / "pyproject.toml").write_text((root / "pyproject.toml").read_text())
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    tools = tmp_path / "tools"  # chromium "installed", so apt is left alone
    tools.mkdir()
    for path, text in ((bin_dir / "python", FAKE_PYTHON), (bin_dir / "vrun", ""),
                       (tools / "chromium", "")):
        path.write_text(text)
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}

    def run_it() -> list[str]:
        (tmp_path / "calls").write_text("")
        subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh"), "-k", "x"], env=env,
                       check=True, capture_output=True, timeout=60)
        return [c for c in (tmp_path / "calls").read_text().splitlines() if c != "-VV"]

    pip = "-m pip install -q --disable-pip-version-check -e .[test,ray]"
    assert run_it() == [pip, "-m pytest -k x"]  # no stamp yet: install
    assert run_it() == ["-m pytest -k x"]  # nothing changed: straight to the tests
    with open(tmp_path / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert run_it() == [pip, "-m pytest -k x"]


# ------------------------------------------------------------------ signals


def test_a_driven_terminal_command_gets_default_signals_in_a_background_suite(
    velda: Velda,
) -> None:
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `scripts/test.sh &` starts it
    try:
        # One process that reports and then waits (a shell's Ctrl-C can fall between its
        # fork and the child's exec, where the shell's own handler takes it)
        term = Terminal(velda, sys.executable, "-c", WAIT_FOR_CTRL_C)
    finally:
        signal.signal(signal.SIGINT, before)
    term.expect(b"ready")
    term.type(b"\x03")  # Ctrl-C ends it: SIGINT reached it
    assert term.wait() == -signal.SIGINT


WAIT_FOR_CTRL_C = "import time; print('ready', flush=True); time.sleep(30)"


def test_tasks_get_default_signals_whoever_started_the_server(velda: Velda) -> None:
    proc = started_in_the_background(
        velda, "vrun", "sh", "-c", "grep SigIgn /proc/$$/status; sleep 30")
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the task's own SigIgn, written once it runs
    mask = int(line.split()[1], 16)
    assert not mask & (1 << (signal.SIGINT - 1)), line  # the server's inherited SIG_IGN
    assert not mask & (1 << (signal.SIGPIPE - 1)), line  # Python's own SIG_IGN
    # vrun itself keeps the SIGINT it was given ignored, as every Unix command does
    assert signal.SIGINT in ignored_signals(proc.pid)
    proc.send_signal(signal.SIGTERM)  # forwarded: ends the task, and then vrun
    assert proc.wait(30) == 128 + signal.SIGTERM


def test_timeout_of_vrun_ends_the_task(velda: Velda) -> None:
    velda.run("vrun", "true", check=True)  # the server is up: the 2 s go to the task
    result = velda.run("timeout", "2", "vrun", "--name", "slow", "sleep", "60")
    assert result.returncode == 124  # timeout's own code: it had to stop vrun
    task = velda.wait("slow", timeout=30)
    assert task["status"] in ("FAILURE", "CANCELLED")
    assert task["signal"] == signal.SIGTERM
    wait_gone(velda.task_pid(task["id"]))


def test_vrun_forwards_usr1_and_exits_with_the_task_code(velda: Velda) -> None:
    script = "trap 'echo got USR1; exit 4' USR1; echo ready; while true; do sleep 0.05; done"
    proc = subprocess.Popen(
        ["vrun", "--name", "usr1", "sh", "-c", script], env=velda.env, cwd=velda.cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)  # (the task's sh may say its sleep got USR1)
    assert (out, proc.returncode) == ("got USR1\n", 4)


def test_sigterm_before_the_task_starts_cancels_it(velda: Velda) -> None:
    velda.vbatch("--name", "first", "sleep", "60")
    proc = subprocess.Popen(
        ["vrun", "--name", "waiting", "--after-success", "first", "true"], env=velda.env,
        cwd=velda.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_signals,
    )
    velda.wait("waiting", until={"PENDING"})
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 125  # it never ran
    assert velda.get("waiting")["status"] == "CANCELLED"
    velda.run("velda", "task", "cancel", "first", check=True)


def test_after_a_cancel_vrun_and_vbatch_follow_exit_alike(velda: Velda) -> None:
    codes = {}
    for command in ("vrun", "vbatch -f"):
        name = command.replace(" ", "")
        proc = subprocess.Popen(
            [*command.split(), "--name", name, "sh", "-c", "echo ready; sleep 60"],
            env=velda.env, cwd=velda.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        velda.wait(name, until={"RUNNING"})
        velda.run("velda", "task", "cancel", name, check=True)
        _, err = proc.communicate(timeout=30)
        task = velda.get(name)
        assert (task["status"], task["signal"]) == ("CANCELLED", signal.SIGTERM)
        codes[command] = proc.returncode
        assert f"task {task['id']} cancelled" in err or f"task {task['id']}: CANCELLED" in err
    assert codes == {"vrun": 128 + signal.SIGTERM, "vbatch -f": 128 + signal.SIGTERM}


# ------------------------------------------------------------------ live output


PRINTS = ("import time\n"
          "for i in range(4):\n"
          "    print(i, time.monotonic())\n"
          "    time.sleep(0.5)\n")


def test_python_prints_arrive_live_through_vrun(velda: Velda) -> None:
    velda.env.pop("PYTHONUNBUFFERED", None)  # the machine sets it; a user's shell does not
    proc = subprocess.Popen(
        ["vrun", sys.executable, "-c", PRINTS], env=velda.env, cwd=velda.cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    arrived, written = [], []
    for line in proc.stdout:
        arrived.append(time.monotonic())
        written.append(float(line.split()[1]))
    assert proc.wait(30) == 0
    assert len(arrived) == 4
    # buffered, all four would arrive at once at the end; live, as far apart as written
    assert arrived[-1] - arrived[0] > (written[-1] - written[0]) / 2


def test_a_submitters_own_pythonunbuffered_is_kept(velda: Velda) -> None:
    shown = velda.run("vrun", "sh", "-c", 'echo "[$PYTHONUNBUFFERED]"',
                      env={"PYTHONUNBUFFERED": "x"})
    assert shown.stdout == "[x]\n"


# ------------------------------------------------------------------ messages


def test_a_missing_program_says_so(velda: Velda) -> None:
    result = velda.run("vrun", "--name", "missing", "nosuchprogram", "--flag")
    assert result.returncode == 127
    assert result.stderr == "velda: cannot run 'nosuchprogram': command not found\n"
    task = velda.get("missing")
    assert task["reason_detail"] == "cannot run 'nosuchprogram': command not found"
    shown = velda.run("velda", "task", "get", "missing", check=True).stdout
    assert "cannot run 'nosuchprogram': command not found" in shown


def test_a_script_without_its_exec_bit_says_so(velda: Velda) -> None:
    (velda.cwd / "noexec.sh").write_text("#!/bin/sh\necho hi\n")
    result = velda.run("vrun", "--name", "noexec", "./noexec.sh")
    assert result.returncode == 126
    assert result.stderr == "velda: permission denied: ./noexec.sh is not executable\n"
    assert velda.get("noexec")["reason_detail"] == (
        "permission denied: ./noexec.sh is not executable")
    missing = velda.run("vrun", "./nosuch.sh")
    assert (missing.returncode, missing.stderr) == (
        127, "velda: cannot run './nosuch.sh': no such file\n")


def test_vrun_and_vbatch_follow_say_when_a_task_timed_out(velda: Velda) -> None:
    result = velda.run("vrun", "--name", "late", "--timeout", "1s", "sleep", "30")
    task = velda.get("late")
    assert result.returncode == 128 + signal.SIGTERM
    assert result.stderr == f"vrun: task {task['id']} timed out after 1s\n"
    followed = velda.run("vbatch", "-f", "--timeout", "1s", "sleep", "30")
    task_id = followed.stdout.split()[0]
    assert f"task {task_id}: FAILURE (timed out after 1s)" in followed.stderr


def test_the_ctrl_c_question_holds_the_output_until_answered(velda: Velda) -> None:
    term = Terminal(velda, "vbatch", "-f", "--name", "ticking", "sh", "-c",
                    "echo ready; i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.1; done")
    term.expect(b"ready")
    term.type(b"\x03")
    term.expect(b"[y/N] ")
    time.sleep(1)  # ten ticks' time
    term.expect(b"[y/N] ")
    asked = term.screen.index(b"[y/N] ")
    assert b"tick" not in term.screen[asked:]  # the question stays the last line
    term.type(b"y\n")
    term.wait()
    assert b"tick" in term.screen[asked:]  # what was held back is written after the answer
    assert velda.get("ticking")["status"] == "CANCELLED"


def test_watch_prints_its_final_line_last(velda: Velda) -> None:
    parent = velda.vbatch("bash", "-c", "for i in 1 2 3; do vbatch true; done")
    out = velda.sh(f"velda task watch {parent} 2>&1", check=True).stdout
    assert out.splitlines()[-1] == f"task {parent}: SUCCESS"
    assert f"task {parent}: 3/3 done" in out


def test_help_describes_every_task_command_with_examples(velda: Velda) -> None:
    for verb in ("", "log", "get", "list", "search", "watch", "cancel", "retry"):
        text = velda.run("velda", "task", *([verb] if verb else []), "--help", check=True).stdout
        assert "example" in text, verb
        assert text.split("\n\n")[1].strip(), f"no description for velda task {verb}"
    log_help = velda.run("velda", "task", "log", "--help", check=True).stdout
    assert "2>&1" in log_help
    velda.vbatch("true")
    header = velda.run("velda", "task", "list", check=True).stdout.splitlines()[0]
    assert "CHILDREN(OK/FAILED/ALL)" in header

