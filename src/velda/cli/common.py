"""What every command shares: error handling, exit codes, connecting to the server."""

from __future__ import annotations

import argparse
import os
import sys

from velda.client import Client, VeldaError

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_ERROR = 1
EXIT_NEVER_RAN = 125
NEVER_RAN = ("FAILED_UPSTREAM", "SKIPPED")


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    print(f"{_prog()}: {message}", file=sys.stderr)
    raise SystemExit(code)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "velda"


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body; turn errors into one line on stderr and the right exit code."""
    try:
        return body()
    except VeldaError as e:
        fail(str(e), EXIT_USAGE if e.is_usage else EXIT_ERROR)
    except BrokenPipeError:
        return 0


def connect(quiet: bool = False) -> Client:
    return Client(quiet=quiet)


def exit_code_of(task: dict[str, Any]) -> int:
    """The exit code of vrun and vbatch -f for a final task (SPEC §3.1)."""
    status = task["status"]
    if status in NEVER_RAN or (status == "CANCELLED" and task.get("started_at") is None):
        return EXIT_NEVER_RAN
    if task.get("signal"):
        return 128 + int(task["signal"])
    code = task.get("exit_code")
    if status == "SUCCESS":
        return 0
    return code if code else EXIT_ERROR


def how_it_ended(task: dict[str, Any]) -> str | None:
    """An end that the task's own output does not tell, in words: `timed out after 1s`,
    `cancelled`, `lost: ...`; None for an end by the command's own exit or signal."""
    reason = task.get("reason")
    if reason == "timeout":
        return f"timed out after {span(float(task.get('timeout_s') or 0))}"
    if reason == "cancelled" or (task["status"] == "CANCELLED" and task.get("started_at")):
        return "cancelled"
    if reason == "lost":
        return "lost: its process or node went away before it reported an exit status"
    return None


def span(seconds: float) -> str:
    """90 -> `90s`, 1800 -> `30m`, 7200 -> `2h`: as --timeout takes them."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, given the width itself: left to find it, argparse imports shutil
    on every run (it builds a formatter for each add_argument), a cost paid by each vbatch."""
    try:
        width = os.get_terminal_size().columns - 2
    except OSError:
        width = 78
    return argparse.RawDescriptionHelpFormatter(prog, width=max(width, 40))


def show_notice(quiet: bool, prog: str, task: dict[str, Any]) -> None:
    """A pool's capacity notice, once per pool per session of the terminal (a marker file
    per pool and session id), and never from inside a task, whose stderr is its log."""
    text = task.get("notice")
    if not text or quiet or os.environ.get("VELDA_TASK_ID"):
        return
    from velda.paths import velda_home

    folder = os.path.join(velda_home(), "notices")
    mark = os.path.join(folder, f"{str(task['pool']).replace('/', '_')}.{os.getsid(0)}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return
    except OSError:
        pass  # cannot remember it: say it again rather than never
    print(f"{prog}: notice: {text}", file=sys.stderr, flush=True)


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
