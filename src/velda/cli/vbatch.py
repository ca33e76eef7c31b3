"""vbatch: queue a command as a task; print its ID (SPEC §3.1).

The common case goes by velda.cli.fast_submit, which imports neither argparse nor the client;
whatever it leaves is done here, under the idempotency key it may already have sent."""

from __future__ import annotations

import sys

from velda.cli import fast_submit

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from velda.cli.follow import Follower


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    key = fast_submit.new_key()
    done = fast_submit.submit(args, key)
    return full(args, key) if done is None else done


def full(argv: list[str], key: str) -> int:
    """Every option and error, starting or waiting for the server, following the task."""
    from velda.cli.common import run_command
    from velda.cli.submit import EPILOG_VBATCH, check_command, parser, request_of

    p = parser("vbatch", "Queue a command as a task and print its ID.", EPILOG_VBATCH,
               follow=True)
    args = p.parse_args(argv)
    check_command(p, args)
    request = request_of(p, args, blocking=args.follow)
    return run_command(lambda: _vbatch(request, args.follow, args.quiet, key))


def _vbatch(request: dict[str, object], follow: bool, quiet: bool, key: str) -> int:
    from velda.cli.common import connect, say, show_notice

    client = connect(quiet)
    # Client.submit's call, with the key the fast path may have sent this request under
    task = client.call("POST", "/api/v1/tasks", request, {"Idempotency-Key": key})
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
