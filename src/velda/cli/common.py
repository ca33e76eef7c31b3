"""What every command shares: error handling, exit codes, connecting to the server."""

from __future__ import annotations

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
    import os

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


def say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
