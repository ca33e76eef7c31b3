"""Telling a process we started from another that got its pid later."""

from __future__ import annotations

import os
import time

_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def boot_ticks() -> int:
    """Now, in the unit and from the origin of a process's start time (clock ticks since
    boot, as the kernel counts them: CLOCK_BOOTTIME)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _NS_PER_TICK


def start_time_since(pid: int, before: int) -> int | None:
    """The start time of a process started after `before` (boot_ticks()) and just now: that
    tick itself when the clock has not ticked since, else read. Reading /proc/PID/stat of a
    process still in its exec waits for the exec: a spawn's read costs more than the spawn."""
    return before if boot_ticks() == before else start_time(pid)


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
