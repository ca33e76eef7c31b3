"""posix_spawn with a working directory: a task's command started straight from the server.

`os.posix_spawn` cannot change the child's directory, and `subprocess` cannot put a signal
ignored by the server back to its default. The C library's `posix_spawn` can do both
(`posix_spawn_file_actions_addchdir_np`, glibc 2.29 and musl), called here through ctypes:
one vfork, the files opened and the directory entered in the child, one exec; nothing of the
server is copied. Where the C library lacks it, `available()` is False and the engine keeps
its status-file wrapper for every task.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Iterable, Sequence

from velda.engines.libc import LIBC

_SETSIGDEF = 0x04  # POSIX_SPAWN_SETSIGDEF
_SETSIGMASK = 0x08  # POSIX_SPAWN_SETSIGMASK
_SETSID = 0x80  # POSIX_SPAWN_SETSID (glibc 2.26, musl)
# the C types are opaque; these sizes hold them with room to spare (glibc: 80, 336, 128 bytes)
_ACTIONS_SIZE, _ATTR_SIZE, _SIGSET_SIZE = 256, 1024, 256
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()

_libc = LIBC if LIBC is not None and hasattr(LIBC, "posix_spawn_file_actions_addchdir_np") \
    else None


def available() -> bool:
    return _libc is not None


# (fd, path, flags, mode): path opened onto fd in the child, before the directory changes
Open = tuple[int, str, int, int]


def spawn(path: str, argv: Sequence[str], env: dict[str, str], cwd: str,
          opens: Iterable[Open], default_signals: tuple[signal.Signals, ...]) -> int:
    """The pid of `argv` run from `path` in `cwd`, leading a new session, with `opens` done,
    `default_signals` at their default action and no signal blocked. OSError where it cannot
    start (its errno as the C library says: ENOENT, EACCES, ENOEXEC...), ValueError for an
    argument or environment the system cannot take."""
    assert _libc is not None
    if any(not key or "=" in key for key in env):
        raise ValueError("illegal environment variable name")
    c_argv = _strings(argv)
    c_env = _strings(f"{k}={v}" for k, v in env.items())
    actions = ctypes.create_string_buffer(_ACTIONS_SIZE)
    _check(_libc.posix_spawn_file_actions_init(actions))
    try:
        for fd, file, flags, mode in opens:
            _check(_libc.posix_spawn_file_actions_addopen(actions, fd, os.fsencode(file),
                                                          flags, mode))
        _check(_libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)))
        pid = ctypes.c_int()
        _check(_libc.posix_spawn(ctypes.byref(pid), os.fsencode(path), actions,
                                 _attributes(default_signals), c_argv, c_env))
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)


def _strings(items: Iterable[str]) -> ctypes.Array[ctypes.c_char_p]:
    """A NULL-terminated char* array; ValueError for a NUL byte or text not encodable (a lone
    surrogate: UnicodeError), as os.fsencode says."""
    encoded: list[bytes | None] = [item.encode(_FS_ENCODING, _FS_ERRORS) for item in items]
    if b"\0" in b"".join(encoded):  # type: ignore[arg-type]  # no None in it yet
        raise ValueError("embedded null byte")
    encoded.append(None)
    return (ctypes.c_char_p * len(encoded))(*encoded)


@functools.cache
def _attributes(defaults: tuple[signal.Signals, ...]) -> ctypes.Array[ctypes.c_char]:
    """The spawn attributes, the same for every spawn (made once, read by each): a new
    session, `defaults` at their default action, no signal blocked."""
    assert _libc is not None
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _check(_libc.posix_spawnattr_init(attr))
    _set_signals(attr, defaults)
    _check(_libc.posix_spawnattr_setflags(attr, ctypes.c_short(_SETSID | _SETSIGDEF
                                                               | _SETSIGMASK)))
    return attr


def _set_signals(attr: ctypes.Array[ctypes.c_char], defaults: Iterable[signal.Signals]) -> None:
    assert _libc is not None
    to_default = ctypes.create_string_buffer(_SIGSET_SIZE)
    none = ctypes.create_string_buffer(_SIGSET_SIZE)
    _libc.sigemptyset(to_default)
    _libc.sigemptyset(none)
    for signum in defaults:
        _libc.sigaddset(to_default, int(signum))
    _check(_libc.posix_spawnattr_setsigdefault(attr, to_default))
    _check(_libc.posix_spawnattr_setsigmask(attr, none))


def _check(error: int) -> None:
    """posix_spawn's functions return an errno (0: done) rather than set errno."""
    if error:
        raise OSError(error, os.strerror(error))
