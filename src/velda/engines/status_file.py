"""The status-file wrapper: how an engine keeps a task's exact exit status without the server.

A tiny `/bin/sh` script runs the task's command with stdout on fd 1 and stderr on fd 3, both
opened by whoever starts it onto the attempt's log files, and writes the command's CPU totals
and then its exit status to `status` in the attempt directory (its shell's pid to `pid` when it
starts). It runs the same under the local engine and inside a Slurm job, so an attempt's exit
code and signal survive the server, and a cluster that forgets finished jobs.

    sh -c WRAPPER velda-task ATTEMPT_DIR CWD ARGV...

It reports a command killed by signal N as 128+N, like every shell: `exit_from_status` reads
an exit status above 128 as that signal. A task the local engine spawns without the wrapper
gets the same file from the reaper of a server that died before storing its end
(`write_status`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from velda.engines.proc_tree import TIMES, times_text
from velda.models import Exit

_TIME = re.compile(r"(\d+)m([\d.]+)s")
STATUS = "status"  # the wrapper's: its command's CPU totals, then its exit status
PID = "pid"  # the wrapper's: its shell's pid, written just before the command starts

WRAPPER = r"""
d=$1
cd "$2" 2>/dev/null || {
  echo "velda: cannot enter the working directory $2" >&3; echo 126 > "$d/status"; exit 126; }
shift 2
echo $$ > "$d/pid"
echo '        ' > "$d/status"
trap : INT TERM HUP QUIT USR1 USR2
( exec 2>&3 3>&-
  case $1 in
  */*) if [ ! -e "$1" ]; then echo "velda: cannot run '$1': no such file" >&2; exit 127
       elif [ ! -f "$1" ] || [ ! -x "$1" ]; then
         echo "velda: permission denied: $1 is not executable" >&2; exit 126; fi ;;
  *) command -v "$1" >/dev/null || {
       echo "velda: cannot run '$1': command not found" >&2; exit 127; } ;;
  esac
  exec "$@" )
s=$?
{ command times; echo $s; } 1<> "$d/status"
exit $s
"""
# fd 3 is the task's stderr; the wrapper's own stderr is /dev/null, so that the shell's note
# about a child killed by a signal ("Killed") never lands in the task's stderr. The subshell
# execs the command: one fork per task, as without it; the trap is reset in it. Before the
# exec it looks the command up with builtins only (no fork), so that a command that cannot
# start says why in words a user can act on, with a shell's exit codes (127, 126), instead of
# the shell's own "velda-task: 7: exec: ...: not found".
# `times` (a builtin: no fork) writes the CPU time of the shell and of what it waited for,
# the command and everything it reaped, so the server gets an attempt's exact CPU totals
# (server/usage.py) without watching it end. They go first, into the status file, and the
# exit status last, alone on its line: one file for both (a file fewer to make for every
# task), and a reader that sees the status sees the totals whole (read_status). `command`
# takes away its rank of special builtin, whose failure would end the shell before the status.
# The status file is written blank at the start and overwritten in place (`1<>`) at the end,
# so the exit status finds room on a disk that filled up meanwhile (its first block is
# already the file's); the wrapper also exits with it, for the server to read from waitpid
# when even that failed.


def write_status(attempt_dir: Path, exit: Exit) -> None:
    """What the wrapper writes, for a command started without it (its parent writes it for
    it): the CPU totals (user, system) of the command and of what it reaped, then its exit
    status as a shell reports it. OSError where it cannot be written."""
    text = times_text(*(exit.cpu or (0.0, 0.0))) + f"{status_of(exit)}\n"
    fd = os.open(attempt_dir / STATUS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def status_of(exit: Exit) -> int:
    """An exit status as a shell reports it (128+N for signal N): exit_from_status's inverse."""
    if exit.signal is not None:
        return 128 + exit.signal
    return exit.exit_code or 0


def exit_from_status(code: int) -> Exit:
    if 128 < code <= 128 + 64:
        return Exit.from_signal(code - 128)
    return Exit.from_code(code)


def read_status(attempt_dir: Path) -> int | None:
    """The exit status the wrapper wrote: the last line of `status` that is not blank, if it
    is a number and nothing else. None while the command runs (the file is blank), while the
    wrapper is still writing, or where it cannot be read. An attempt of an older velda wrote
    only the number there (over the blank, so blank space may follow it)."""
    text = _read_head(attempt_dir / STATUS, 256)
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines or not (lines[-1].isascii() and lines[-1].isdigit()):
        return None
    return int(lines[-1])


def wrapper_started(attempt_dir: Path) -> float | None:
    """When the wrapper started the command: the time of the `pid` file it writes just before
    (None if it has not written it yet, or never ran here)."""
    try:
        return os.lstat(attempt_dir / PID).st_mtime
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """The number in a file the task's side wrote, or None (absent, blank, not a number)."""
    try:
        return int(read_word(path) or "")
    except ValueError:
        return None


def read_word(path: Path) -> str | None:
    """The first 64 bytes of a file the task's side wrote, stripped, or None where it cannot
    be read. A symlink or a FIFO there must not make the server read another file or block
    (a pool's task user owns these files)."""
    text = _read_head(path, 64)
    return None if text is None else text.strip()


def _read_head(path: Path, size: int) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, size).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def read_times(attempt_dir: Path) -> tuple[float, float] | None:
    """The user and system CPU seconds of an ended attempt's command and what it reaped, from
    its status file (the wrapper's), else its `times` file (a Ray attempt's, or an older
    velda's wrapper); None where neither holds them whole (it was killed, or still runs)."""
    for name in (STATUS, TIMES):
        text = _read_head(attempt_dir / name, 256)
        found = _TIME.findall(text) if text else []
        if len(found) == 4:  # the shell's own user and system, then its children's
            seconds = [int(m) * 60 + float(s) for m, s in found]
            return seconds[0] + seconds[2], seconds[1] + seconds[3]
    return None


def unusable_env(env: dict[str, str], error: ValueError) -> str:
    """A line naming the environment variable the system cannot take."""
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            return f"cannot start: environment variable name {key!r} is not valid"
        if "\0" in value:
            return f"cannot start: environment variable {key} holds a NUL byte"
        try:
            os.fsencode(key), os.fsencode(value)
        except UnicodeError:
            return f"cannot start: environment variable {key!r} is not valid text"
    return f"cannot start: the environment is not valid ({error})"
