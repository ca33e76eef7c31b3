"""The engine contract (engines/base.py): one suite that every engine passes, run on the local
engine, on a real Ray cluster (ray_cluster.py) and on a real Slurm cluster (slurm_cluster.py).

Each test drives the engine directly, as the server does, through engine_harness.Harness, whose
Recorder fails a test whose engine reports off the event loop, twice, or out of order. What
only one engine does (Ray's placement and dead drivers, Slurm's job arrays and heartbeats) is
in that engine's own tests.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine_harness import (
    GROUP,
    Harness,
    group_pids,
    local_harness,
    python,
    ray_harness,
    slurm_harness,
)
from velda.engines.base import NotStartedError
from velda.models import Exit, Reason
from velda_cli import alive


@pytest.fixture(scope="module", params=[
    "local",
    pytest.param("ray", marks=pytest.mark.ray),
    pytest.param("slurm", marks=pytest.mark.slurm),
])
def engine(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    if request.param == "local":
        with local_harness() as h:
            yield h
    elif request.param == "ray":
        with ray_harness(request.getfixturevalue("ray_cluster").address) as h:
            yield h
    else:
        bin_dir = tmp_path_factory.mktemp("slurm-bin")
        request.getfixturevalue("slurm").write_clients(bin_dir)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
            with slurm_harness() as h:
                yield h


@pytest.fixture
def restarted(engine: Harness) -> Iterator[Harness]:
    """A second engine on the same pool, as a server started after a crash makes it."""
    h = engine.with_options()
    try:
        yield h
    finally:
        h.close()


# The same bytes are computed here and written by the task: ~5 MB of stdout in pieces of
# every size, with bytes that are not UTF-8 and no final newline, interleaved with stderr
# lines, so a lost, doubled, reordered, re-encoded or crossed byte shows.
OUT_EXPR = 'b"".join(b"%07d out \\xff%s\\n" % (i, b"x" * (i % 61)) for i in range(120000))+b"."'
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


def test_stdout_and_stderr_land_in_their_files_byte_for_byte(engine: Harness,
                                                             tmp_path: Path) -> None:
    launch = engine.launch(tmp_path, python(WRITER))
    assert engine.run_to_end(launch) == Exit(0)
    out, err = eval(OUT_EXPR), eval(ERR_EXPR)
    assert len(out) > 5_000_000
    assert launch.stdout_path.read_bytes() == out
    assert launch.stderr_path.read_bytes() == err


def test_output_is_in_the_file_while_the_command_runs(engine: Harness, tmp_path: Path) -> None:
    launch = engine.launch(tmp_path, python("import time; print('first', flush=True);"
                                            " time.sleep(60)"))
    handle = engine.start(launch)
    engine.wait_running(launch)
    engine.wait_output(launch, "first\n", timeout_s=10)
    assert (launch.task_id, 1) not in engine.events.ended
    engine.run(engine.engine.cancel(handle, 5))
    assert engine.wait_exit(launch).signal == signal.SIGTERM


def test_exit_codes_and_signals_are_exact(engine: Harness, tmp_path: Path) -> None:
    cases = {
        "true": Exit(0),
        "exit 3": Exit(3, None, Reason.EXIT),
        "kill -TERM $$": Exit(None, signal.SIGTERM, Reason.SIGNAL),
        "kill -KILL $$": Exit(None, signal.SIGKILL, Reason.SIGNAL),
    }
    launches = [engine.launch(tmp_path, ["sh", "-c", script]) for script in cases]
    results = engine.run(engine.engine.start_many(launches))
    assert len(results) == len(cases) and all(isinstance(r, dict) for r in results), results
    assert [engine.wait_exit(launch) for launch in launches] == list(cases.values())
    assert all((launch.task_id, 1) in engine.events.started for launch in launches)


def test_the_command_gets_its_environment_working_directory_and_no_stdin(
    engine: Harness, tmp_path: Path
) -> None:
    workdir = tmp_path / "project dir"
    workdir.mkdir()
    value = "it's a \"quoted\" $VALUE\nwith a newline"
    launch = engine.launch(tmp_path, python(
        "import json, os, sys; print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ),"
        " 'stdin': sys.stdin.read()}))"),
        env={"GREETING": value, "CUDA_VISIBLE_DEVICES": "7",
             "VELDA_SERVER": "http://127.0.0.1:1"}, cwd=workdir)
    assert engine.run_to_end(launch) == Exit(0), launch.stderr_path.read_text()
    seen = json.loads(launch.stdout_path.read_text())
    assert seen["cwd"] == str(workdir)
    assert seen["env"]["PWD"] == str(workdir)
    assert seen["env"]["GREETING"] == value
    assert seen["env"]["VELDA_SERVER"] == "http://127.0.0.1:1"  # the launch's, as given
    assert seen["env"].get("CUDA_VISIBLE_DEVICES", "") == ""  # no GPU asked: not the submitter's
    assert seen["stdin"] == ""


def test_a_command_that_cannot_start_says_why(engine: Harness, tmp_path: Path) -> None:
    missing = engine.launch(tmp_path, ["velda-no-such-command", "--flag"])
    assert engine.run_to_end(missing) == Exit(127, None, Reason.EXIT)
    assert "velda: cannot run 'velda-no-such-command'" in missing.stderr_path.read_text()


def test_cancel_ends_the_whole_process_group(engine: Harness, tmp_path: Path) -> None:
    launch = engine.launch(tmp_path, GROUP)
    handle = engine.start(launch)
    pids = group_pids(engine, launch)
    started = time.monotonic()
    engine.run(engine.engine.cancel(handle, 10))
    assert engine.wait_exit(launch) == Exit(None, signal.SIGTERM, Reason.SIGNAL)
    assert time.monotonic() - started < 5
    engine.wait(lambda: not any(map(alive, pids)), 5, "the whole group gone")


def test_cancel_kills_a_command_that_ignores_sigterm_after_the_grace_period(
    engine: Harness, tmp_path: Path
) -> None:
    launch = engine.launch(tmp_path, python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(1000)"))
    handle = engine.start(launch)
    engine.wait_output(launch, "ready")
    started = time.monotonic()
    engine.run(engine.engine.cancel(handle, 1))
    assert engine.wait_exit(launch) == Exit(None, signal.SIGKILL, Reason.SIGNAL)
    assert 1 <= time.monotonic() - started < 6


def test_a_signal_reaches_the_command(engine: Harness, tmp_path: Path) -> None:
    launch = engine.launch(tmp_path, python(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, lambda n, f: (print('got', n, flush=True), sys.exit(0)))\n"
        "print('ready', flush=True); time.sleep(1000)"))
    handle = engine.start(launch)
    engine.wait_output(launch, "ready")
    engine.run(engine.engine.signal(handle, signal.SIGINT))
    assert engine.wait_exit(launch) == Exit(0)
    assert launch.stdout_path.read_text() == f"ready\ngot {int(signal.SIGINT)}\n"


def test_after_a_restart_a_running_attempt_is_followed_to_its_end(
    engine: Harness, tmp_path: Path
) -> None:
    old = engine.with_options()
    launch = old.launch(tmp_path, ["sh", "-c", "echo one; sleep 2; echo two; exit 6"])
    handle = old.start(launch)
    old.wait_output(launch, "one\n")
    old.close()  # the server stops; the attempt runs on
    new = engine.with_options()
    try:
        new.run(new.engine.adopt(launch.task_id, 1, handle, launch))
        assert new.wait_exit(launch, timeout_s=30) == Exit(6, None, Reason.EXIT)
        assert launch.stdout_path.read_text() == "one\ntwo\n"
    finally:
        new.close()


def test_an_adopted_attempt_can_be_cancelled(engine: Harness, tmp_path: Path) -> None:
    old = engine.with_options()
    launch = old.launch(tmp_path, GROUP)
    handle = old.start(launch)
    pids = group_pids(old, launch)
    old.close()
    new = engine.with_options()
    try:
        new.run(new.engine.adopt(launch.task_id, 1, handle, launch))
        new.run(new.engine.cancel(handle, 5))
        assert new.wait_exit(launch, timeout_s=30) == Exit(None, signal.SIGTERM, Reason.SIGNAL)
        new.wait(lambda: not any(map(alive, pids)), 5, "the whole group gone")
    finally:
        new.close()


def test_adopt_reports_an_attempt_that_ended_while_no_server_watched(
    engine: Harness, restarted: Harness, tmp_path: Path
) -> None:
    launch = engine.launch(tmp_path, ["sh", "-c", "exit 4"])
    handle = engine.start(launch)
    assert engine.wait_exit(launch) == Exit(4, None, Reason.EXIT)
    restarted.run(restarted.engine.adopt(launch.task_id, 1, handle, launch))
    assert restarted.wait_exit(launch, timeout_s=30) == Exit(4, None, Reason.EXIT)


def test_adopt_of_an_attempt_that_never_started_lets_it_be_queued_again(
    restarted: Harness, tmp_path: Path
) -> None:
    launch = restarted.launch(tmp_path, ["true"])
    with pytest.raises(NotStartedError):
        restarted.run(restarted.engine.adopt(launch.task_id, 1, {}, launch))
    assert not restarted.events.started and not restarted.events.ended
