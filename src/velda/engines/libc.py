"""The C library, loaded once, for what Python's os module does not offer: posix_spawn with a
working directory (spawn.py), waitid with a rusage (zombie.py), the child-subreaper prctl
(reaper.py). None where it cannot be loaded: the callers fall back, or say so."""

from __future__ import annotations

import ctypes

LIBC: ctypes.CDLL | None
try:
    LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:
    LIBC = None
