"""The options vrun and vbatch share (SPEC §3.1), turned into a submit request."""

from __future__ import annotations

import argparse
import os

from velda.cli.common import help_formatter

TYPE_CHECKING = False  # typing is not imported at run time: it slows every vbatch
if TYPE_CHECKING:
    from typing import Any


EPILOG_VRUN = """examples:
  vrun python train.py --epochs 3          run here-and-now as a tracked task
  vrun -P gpu-1 --name infer ./infer.py    in the gpu-1 pool, named 'infer'
  vrun -P gpu-1                            your shell on the gpu-1 pool (at a terminal)
  vrun --tty no make test                  at a terminal, but stdout and stderr apart
  ls data/*.csv | xargs -I{} vrun -P cpu-1 python clean.py {}
"""
EPILOG_VBATCH = """examples:
  ID=$(vbatch python train.py)                         queue it, keep the ID
  vbatch -P cpu-2 --name process python process.py
  vbatch --name train --after-success process python train.py
  vbatch -N 4 python shard.py                          4 shards: VELDA_SHARD_ID=0..3
  vbatch -f --retries 2 --timeout 30m ./flaky.sh       follow it, retry twice
"""


def parser(
    prog: str, description: str, epilog: str, follow: bool = False
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog,
        formatter_class=help_formatter,
    )
    if follow:
        p.add_argument("-f", "--follow", action="store_true",
                       help="wait for it, stream its output, exit with its exit code")
    p.add_argument("-P", "--pool", help="pool to run in (default: shell)")
    p.add_argument("-n", "--name", help="task name (1-200 printable characters)")
    p.add_argument("--after-success", action="append", default=[], metavar="REF",
                   help="start only after REF succeeds (repeatable, comma-separated)")
    p.add_argument("--after-fail", action="append", default=[], metavar="REF",
                   help="start only after REF fails")
    p.add_argument("--after", action="append", default=[], metavar="REF",
                   help="start after REF ends, whatever its outcome")
    p.add_argument("-l", "--label", action="append", default=[], metavar="K=V",
                   help="label (repeatable)")
    p.add_argument("--priority", type=int, default=0, help="lower is served first (default 0)")
    p.add_argument("-N", "--total-shards", type=int, metavar="N",
                   help="run N copies as children 0..N-1")
    p.add_argument("--gang", action="store_true", help="with -N: all shards start together")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set (K=V) or pass (K) an environment variable")
    p.add_argument("-C", "--directory", metavar="DIR", help="working directory")
    p.add_argument("--retries", type=int, default=0, help="re-run a failed attempt up to N times")
    p.add_argument("--timeout", metavar="DURATION", help="kill an attempt after 90s, 30m, 2h...")
    p.add_argument("-q", "--quiet", action="store_true", help="no chatter on stderr")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    return p


def request_of(
    p: argparse.ArgumentParser, args: argparse.Namespace, blocking: bool
) -> dict[str, Any]:
    env = dict(os.environ)
    for item in args.env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key not in os.environ:
            p.error(f"-e {key}: not set in this environment")
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--label {item!r} is not KEY=VALUE")
        labels[key] = value
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    cwd = os.path.abspath(args.directory) if args.directory else os.getcwd()
    request: dict[str, Any] = {
        "command": command, "pool": args.pool, "name": args.name,
        "after_success": args.after_success, "after_fail": args.after_fail,
        "after": args.after, "labels": labels, "env": env, "cwd": cwd,
        "priority": args.priority, "gang": args.gang, "retries": args.retries,
        "blocking": blocking,
    }
    if args.total_shards is not None:
        request["total_shards"] = args.total_shards
    if args.timeout:
        request["timeout"] = args.timeout
    return request


def check_command(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.command and args.total_shards is None:
        p.error(f"give a command to run, for example: {p.prog} python train.py")
