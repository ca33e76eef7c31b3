"""Telling a process we started from another that got its pid later."""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """The kernel's start time of pid (clock ticks since boot), or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(stat.rsplit(b")", 1)[1].split()[19])


def same_process(pid: int, start: int | None) -> bool:
    return start is not None and start_time(pid) == start
