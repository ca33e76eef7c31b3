"""vbatch: queue a command as a task; print its ID (SPEC §3.1)."""

from __future__ import annotations

import sys

from velda.cli.common import connect, run_command, say, show_notice
from velda.cli.submit import EPILOG_VBATCH, check_command, parser, request_of

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from velda.cli.follow import Follower


def main(argv: list[str] | None = None) -> int:
    p = parser("vbatch", "Queue a command as a task and print its ID.", EPILOG_VBATCH,
               follow=True)
    args = p.parse_args(argv)
    check_command(p, args)
    request = request_of(p, args, blocking=args.follow)
    return run_command(lambda: _vbatch(request, args.follow, args.quiet))


def _vbatch(request: dict[str, object], follow: bool, quiet: bool) -> int:
    client = connect(quiet)
    task = client.submit(**request)
    show_notice(quiet, "vbatch", task)
    print(task["id"], flush=True)
    say(quiet, client.web_url(task["id"]))
    if not follow:
        return 0
    from velda.cli.follow import Follower, StatusPrinter, wait_for  # threading: only for -f

    printer = StatusPrinter(quiet)
    follower = Follower(client, task["id"], printer)
    return wait_for(follower, lambda n: _detach(client, task["id"], follower))


def _detach(client: object, task_id: str, follower: Follower) -> bool:
    """Ctrl-C: on a terminal ask whether to cancel; otherwise leave the task running. The
    task's output waits while the question does, so that the question stays in sight."""
    if sys.stdin.isatty() and sys.stderr.isatty():
        with follower.output_lock:
            answer = _ask(f"\nCancel the task {task_id}? [y/N] ")
        if answer in ("y", "yes"):
            client.cancel(task_id)  # type: ignore[attr-defined]
            print(f"task {task_id}: cancelling", file=sys.stderr)
            return False
    print(f"detached; task {task_id} keeps running", file=sys.stderr)
    return True


def _ask(question: str) -> str:
    print(question, end="", file=sys.stderr, flush=True)
    try:
        return sys.stdin.readline().strip().lower()
    except KeyboardInterrupt:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
