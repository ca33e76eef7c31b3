"""How an ended child ended, read without reaping it: its wait status and CPU totals at once.

`os.waitid` gives no resource usage, and the C library's `waitid` takes no place for it, but
the system call does: a fifth argument that, with `WNOWAIT`, the kernel fills from the zombie
(the CPU time of the child and of all it reaped, what `times` prints in a shell). One system
call through ctypes, where reading the totals from the zombie's /proc/PID/stat cost more than
the rest of a task's end. Where its number is not known (an architecture other than x86_64
and arm64) or the call fails, it is `os.waitid` and /proc.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import replace

from velda.engines.libc import LIBC
from velda.engines.proc_tree import tree_figures
from velda.models import Exit

# SYS_waitid by machine; 64-bit layouts: siginfo_t is 128 bytes with si_code at 8 and
# si_status at 24, struct rusage begins with two struct timeval (seconds and microseconds)
_SYS_WAITID = {"x86_64": 247, "aarch64": 95, "arm64": 95}.get(os.uname().machine)
_SI_CODE, _SI_STATUS = 2, 6  # as indexes of 4-byte ints


class _Timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]


class _Rusage(ctypes.Structure):
    _fields_ = [("utime", _Timeval), ("stime", _Timeval), ("rest", ctypes.c_long * 14)]


_libc = LIBC if _SYS_WAITID is not None else None


def ended(pid: int) -> tuple[int, int, tuple[float, float]]:
    """(si_code, si_status, (user seconds, system seconds)) of `pid`, a child that ended,
    left unreaped: si_code is os.CLD_EXITED with the exit status, or CLD_KILLED/CLD_DUMPED
    with the signal. ChildProcessError where it is no child of this process."""
    if _libc is not None:
        info = (ctypes.c_int * 32)()
        usage = _Rusage()
        flags = os.WEXITED | os.WNOWAIT
        if _libc.syscall(_SYS_WAITID, os.P_PID, pid, info, flags, ctypes.byref(usage)) == 0:
            return info[_SI_CODE], info[_SI_STATUS], (_seconds(usage.utime),
                                                      _seconds(usage.stime))
        if ctypes.get_errno() == errno.ECHILD:
            raise ChildProcessError(errno.ECHILD, os.strerror(errno.ECHILD))
    result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert result is not None
    figures = tree_figures(pid)  # a zombie's /proc/PID/stat: its totals, no children left
    return result.si_code, result.si_status, figures[:2] if figures else (0.0, 0.0)


def read_exit(pid: int) -> Exit:
    """How `pid`, a child that ended, ended, with its CPU totals; left unreaped. Exact: a
    signal is told from an exit status above 128."""
    how, value, cpu = ended(pid)
    exit = Exit.from_code(value) if how == os.CLD_EXITED else Exit.from_signal(value)
    return replace(exit, cpu=cpu)


def _seconds(value: _Timeval) -> float:
    return float(value.sec + value.usec / 1e6)
