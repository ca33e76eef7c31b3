"""What a tree of processes uses now, read from /proc: the figures of a usage sample.

Standard library only, and no velda import: the server samples its local attempts with it
(server/usage.py), and a Ray node samples the attempt it runs (ray_node.py, which is pickled
by value with it: a node has no velda install).

A sample walks the tree under the leader of an attempt's session through
/proc/PID/task/TID/children and reads each process's /proc/PID/stat, nothing for the rest of
the machine: CPU seconds (user and system, the processes' own plus what they reaped), the
resident memory of the whole tree, and how many processes it has.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

SAMPLES = "usage"  # an attempt's samples, one line each, in its directory
TIMES = "times"  # its exact CPU totals once it ended, as the shell builtin `times` writes them


def tree_figures(leader: int) -> tuple[float, float, int, int] | None:
    """(user seconds, system seconds, RSS bytes, processes) of the tree under `leader` as
    /proc shows it now; None once it is gone."""
    user = system = 0
    rss = procs = 0
    stack = [leader]
    while stack:
        pid = stack.pop()
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            threads = int(fields[17])
            stack += _children(pid, threads)
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
        procs += 1
        # fields from 3 on: utime 14, stime 15, cutime 16, cstime 17, rss 24 (man 5 proc)
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
        rss += int(fields[21])
    if procs == 0:
        return None
    tick = os.sysconf("SC_CLK_TCK")  # here, not at import: a Ray node may differ from the server
    return user / tick, system / tick, rss * os.sysconf("SC_PAGE_SIZE"), procs


def sample_line(at: float, figures: tuple[float, float, int, int],
                gpus: list[dict[str, Any]] | None = None) -> str:
    """One line of an attempt's `usage` file (server/usage.py reads it)."""
    user, system, rss, procs = figures
    data: dict[str, Any] = {"t": round(at, 3), "user_s": round(user, 3),
                            "system_s": round(system, 3), "rss": rss, "procs": procs}
    if gpus:
        data["gpus"] = gpus
    return json.dumps(data, separators=(",", ":")) + "\n"


def times_text(user_s: float, system_s: float) -> str:
    """CPU totals written as the shell builtin `times` writes them (the status-file wrapper's
    `times` file): the shell's own line, then its children's."""
    return f"0m0.000s 0m0.000s\n{_minutes(user_s)} {_minutes(system_s)}\n"


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:.3f}s"


def _children(pid: int, threads: int) -> list[int]:
    tids = [str(pid)] if threads <= 1 else os.listdir(f"/proc/{pid}/task")
    found: list[int] = []
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
            found += [int(c) for c in f.read().split()]
    return found
