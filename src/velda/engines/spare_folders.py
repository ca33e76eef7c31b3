"""Spare attempt folders: the folder of a local attempt that ended with empty logs is renamed
to the next local attempt's, instead of a new folder and two new files being made for it.

A start makes three inodes. On tmpfs that takes some µs; on an ext4 disk it took up to
0.6 ms a task minutes after many files were deleted there (the kernel looks past every inode
deleted recently before it takes one; README, "Performance"), where a rename takes 16 µs. A
flood of short tasks that print nothing makes no new inode once its first folders end.

Missing logs read as empty ones (server/logs.py), so the folder of an attempt whose logs are
empty may go. It is offered once its end is in the store (a server killed before that leaves
it where its reaper writes the status), and taken only if nothing else can reach its files
then: the folder holds exactly its two log files, both empty, regular, private (0700, 0600)
and linked once, and no process has either file open. The kernel answers the last: a write
lease (`F_SETLEASE`) is granted only on a file nobody else has open, so a process the command
left behind that still holds its stdout keeps the folder where it is. A file system without
leases reuses no folder.

The offers are kept in memory, the last `KEEP`: a folder not taken stays its attempt's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
from collections import deque
from pathlib import Path

from velda.logindex import STREAMS

KEEP = 64
_LOG_FILES = sorted(STREAMS)  # as a listing is compared to them
_DIR_MODE, _FILE_MODE = 0o700, 0o600
# A lease broken by another process's open (in the moment it is held) sends this signal,
# which is ignored unless handled: the default, SIGIO, would end the server.
_LEASE_SIGNAL = signal.SIGURG
_HELD = (errno.EAGAIN, errno.EBUSY)  # the file is open elsewhere


class SpareFolders:
    def __init__(self, keep: int = KEEP) -> None:
        self._offered: deque[str] = deque(maxlen=keep)  # the newest last
        self._leases = True  # False once the file system refused one: nothing is reused

    def __len__(self) -> int:
        return len(self._offered)

    def offer(self, folder: Path) -> None:
        """The folder of an attempt whose end is stored: another attempt may have it, if its
        logs are empty and nothing else can reach them when it is asked for. One whose logs
        hold something now is not kept (a flood of tasks that print costs a start nothing)."""
        if self._leases and not _has_output(str(folder)):
            self._offered.append(str(folder))

    def take(self, folder: Path) -> bool | None:
        """Rename an offered folder to `folder`: True. False where `folder` is there already
        (made ahead, or by an earlier try); None where none could be had: the caller makes
        it."""
        while self._offered:
            spare = self._offered.pop()  # the newest: the most likely to be cached
            moved = self._move_if_unused(spare, str(folder))
            if moved is False:
                self._offered.append(spare)
            if moved is not None:
                return moved
        return None

    def _move_if_unused(self, spare: str, folder: str) -> bool | None:
        """True: moved. False: `folder` is there. None: `spare` may not be reused."""
        try:
            directory = os.open(spare, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return None
        held: list[int] = []
        try:
            if not _private(os.fstat(directory), _DIR_MODE) \
                    or sorted(os.listdir(directory)) != _LOG_FILES:
                return None
            for name in _LOG_FILES:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                             dir_fd=directory)
                held.append(fd)
                if not _empty_and_private(os.fstat(fd)) or not self._only_open_here(fd):
                    return None
            os.rename(spare, folder)
            return True
        except OSError as e:
            return False if e.errno in (errno.ENOTEMPTY, errno.EEXIST) else None
        finally:
            for fd in (*held, directory):
                os.close(fd)

    def _only_open_here(self, fd: int) -> bool:
        """Whether no other open file description reaches this file (a write lease is
        granted only then). Held until `fd` is closed."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError as e:
            if e.errno not in _HELD:  # no leases here (sysctl fs.leases-enable, NFS, ...)
                self._leases = False
                self._offered.clear()
            return False
        return True


def _has_output(folder: str) -> bool:
    try:
        return any(os.stat(os.path.join(folder, name)).st_size for name in _LOG_FILES)
    except OSError:
        return True


def _private(st: os.stat_result, mode: int) -> bool:
    return st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == mode


def _empty_and_private(st: os.stat_result) -> bool:
    return (stat.S_ISREG(st.st_mode) and st.st_size == 0 and st.st_nlink == 1
            and _private(st, _FILE_MODE))
