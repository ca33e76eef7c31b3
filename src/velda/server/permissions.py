"""The state directory belongs to the server's user alone: the directory 0700, every file 0600.

It holds the server token, every task's logs and, in velda.db, environment values the API
masks. A home made by an older version, by hand or under another umask may be open to others,
so the server fixes it at every start and says so once in server.log.

With a pool that runs tasks as another user (`user = "NAME"`), the home and `logs/` are 0711
instead: that user's wrapper must reach its own attempt directory, but can list nothing, and
every file it could name is 0600 and the server's.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from velda.engines.run_as import SHARED_DIR_MODE

log = logging.getLogger("velda.server")
FILE_MODE = 0o600
DIR_MODE = 0o700
TRAVERSABLE_DIR_MODE = 0o711


def create_private(path: Path) -> None:
    """Create an empty file as 0600 if it does not exist (SQLite gives its -wal and -shm files
    the mode of the database file)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))


def write_private(path: Path, text: str) -> None:
    """Write a small file atomically, 0600 from the start."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, FILE_MODE)  # it may have existed with another mode
    tmp.replace(path)


def secure_home(home: Path, traversable: bool = False) -> int:
    """Make `home` private; return how many entries had to be fixed (and warn if any did).

    The logs are walked only when the home itself was open to others (or is made traversable
    for a task user): inside a 0700 directory nobody else can reach them, and a store of
    100,000 tasks should not cost a walk of every log at each start."""
    top_mode = TRAVERSABLE_DIR_MODE if traversable else DIR_MODE
    was_open = _mode(home) & 0o077 != top_mode & 0o077
    fixed = _fix_dir(home, top_mode)
    logs = home / "logs"
    logs.mkdir(mode=DIR_MODE, exist_ok=True)
    fixed += _fix_dir(logs, top_mode)
    for entry in os.scandir(home):
        if entry.name != "logs":
            fixed += _fix_tree(Path(entry.path))
    if was_open or traversable:
        for entry in os.scandir(logs):
            fixed += _fix_tree(Path(entry.path))
    if fixed:
        log.warning(
            "velda: %s was readable by other users: fixed the permissions of %d entries "
            "(directories 0%o, files 0600)", home, fixed, top_mode,
        )
    return fixed


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _fix_dir(path: Path, mode: int) -> int:
    """Set a directory's mode; count it as a fix only if others lose a permission."""
    old = _mode(path)
    if old == mode or not _chmod(path, mode):
        return 0
    return 1 if old & ~mode & 0o077 else 0


def _fix_tree(path: Path) -> int:
    """Files to 0600 and directories to 0700, all the way down; symlinks are left alone."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return _chmod(path, FILE_MODE) if mode & 0o077 else 0
    if mode == SHARED_DIR_MODE:
        # an attempt directory shared with a pool's task user (run_as.py): its logs were made
        # 0600, the rest is the user's, and a walk there could be led astray by its symlinks
        return 0
    fixed = 0 if mode == DIR_MODE else _chmod(path, DIR_MODE)
    for entry in os.scandir(path):
        fixed += _fix_tree(Path(entry.path))
    return fixed


def _chmod(path: Path, mode: int) -> int:
    # through a descriptor opened without following links: a task user may swap a file of
    # its attempt directory for a symlink between the walk's lstat and this chmod
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except OSError as e:  # not ours (as root everything is); say so and go on
        log.warning("velda: cannot make %s private: %s", path, e.strerror)
        return 0
    return 1
