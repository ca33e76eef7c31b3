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


def connect() -> Client:
    return Client()


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


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, given the width itself: left to find it, argparse imports shutil
    on every run (it builds a formatter for each add_argument), a cost paid by each vbatch."""
    try:
        width = os.get_terminal_size().columns - 2
    except OSError:
        width = 78
    return argparse.RawDescriptionHelpFormatter(prog, width=max(width, 40))


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
