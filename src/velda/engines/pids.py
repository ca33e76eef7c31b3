"""Telling a process we started from another that got its pid later."""

from __future__ import annotations

from pathlib import Path


def start_time(pid: int) -> int | None:
    """The kernel's start time of pid (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def same_process(pid: int, start: int | None) -> bool:
    return start is not None and start_time(pid) == start
