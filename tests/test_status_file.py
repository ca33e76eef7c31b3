"""The status-file wrapper on its own: what it leaves in an attempt directory, and how it is
read back, whole or caught halfway (the exit status of SPEC §4.5 and §10 depends on it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from velda.engines.status_file import (
    STATUS,
    WRAPPER,
    exit_from_status,
    read_int,
    read_status,
    read_times,
)
from velda.models import Exit


def _wrapped(attempt_dir: Path, *argv: str) -> int:
    """argv run by the wrapper as an engine starts it (stderr on fd 3); its own exit code."""
    attempt_dir.mkdir(exist_ok=True)
    script = 'exec 3>&2; exec sh -c "$0" velda-task "$@"'
    done = subprocess.run(["sh", "-c", script, WRAPPER, str(attempt_dir), "/", *argv],
                          capture_output=True, check=False)
    return done.returncode


@pytest.mark.parametrize(("argv", "code"), [
    (["true"], 0),
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "kill -9 $$"], 137),
    (["no-such-command-velda"], 127),
])
def test_the_wrapper_leaves_the_exit_status_and_the_cpu_totals_in_one_file(
    tmp_path: Path, argv: list[str], code: int
) -> None:
    attempt = tmp_path / "a"
    assert _wrapped(attempt, *argv) == code
    assert read_status(attempt) == code
    assert read_int(attempt / "pid") is not None
    assert sorted(p.name for p in attempt.iterdir()) == ["pid", STATUS]
    times = read_times(attempt)
    assert times is not None and all(0 <= t < 5 for t in times)


def test_a_command_killed_by_a_signal_reads_as_that_signal(tmp_path: Path) -> None:
    attempt = tmp_path / "a"
    _wrapped(attempt, "sh", "-c", "kill -TERM $$")
    code = read_status(attempt)
    assert code is not None
    assert exit_from_status(code) == Exit.from_signal(15)


def test_the_cpu_totals_count_what_the_command_spent(tmp_path: Path) -> None:
    attempt = tmp_path / "a"
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    assert _wrapped(attempt, "python3", "-c", spin) == 0
    times = read_times(attempt)
    assert times is not None
    assert 0.3 <= sum(times) < 3


BLANK = " " * 8 + "\n"  # what the wrapper writes when the command starts
TOTALS = "0m0.010000s 0m0.020000s\n0m1.500000s 0m0.250000s\n"


@pytest.mark.parametrize(("content", "status"), [
    (BLANK, None),  # running
    (TOTALS[:30] + BLANK[30:], None),  # the totals caught halfway
    ("0" + BLANK[1:], None),  # a first byte caught alone is not a status
    (TOTALS, None),  # the totals, not yet the status
    (TOTALS + "3\n", 3),
    ("3\n" + BLANK[2:], 3),  # an older velda's wrapper: the number over the blank
    ("126\n", 126),  # the working directory could not be entered
    ("", None),
])
def test_the_status_is_read_only_once_it_is_whole(
    tmp_path: Path, content: str, status: int | None
) -> None:
    (tmp_path / STATUS).write_text(content)
    assert read_status(tmp_path) == status


def test_cpu_totals_come_from_the_status_file_else_a_times_file(tmp_path: Path) -> None:
    (tmp_path / STATUS).write_text(TOTALS + "0\n")
    assert read_times(tmp_path) == pytest.approx((1.51, 0.27))
    (tmp_path / STATUS).write_text("0\n")  # an older wrapper's, or a Ray attempt's
    assert read_times(tmp_path) is None
    (tmp_path / "times").write_text(TOTALS)
    assert read_times(tmp_path) == pytest.approx((1.51, 0.27))


def test_a_status_that_is_not_a_file_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text(TOTALS + "0\n")
    os.symlink(tmp_path / "elsewhere", tmp_path / STATUS)
    assert read_status(tmp_path) is None
