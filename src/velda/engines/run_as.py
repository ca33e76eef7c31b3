"""Running a local pool's tasks as another Unix user (`user = "NAME"` in velda.toml).

The server (root) opens the log files before the switch, so they stay the server's and the task
writes them through the descriptors it inherits. `setpriv` then takes the user's uid, gid and
groups and execs the usual wrapper, so the spawned pid is still the wrapper's and the leader of
its own session: watching, adopting after a restart and `killpg` work as for any task.

The wrapper writes its `pid` and `status` files into the attempt directory, so that directory
is shared with the user's group: owned by root, group-writable and sticky, so the task can add
files but never replace the root-owned logs (a symlink to the token file in place of `stdout`
would otherwise be served back through the logs API). Everything else under the state
directory is the server's and mode 0600/0700, so the task cannot read the token file.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from velda.engines.base import EngineError
from velda.models import Pool

SHARED_DIR_MODE = 0o1770  # root-owned, the task user's group may add files, sticky


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int
    home: str

    def prefix(self) -> list[str]:
        """What the wrapper's argv is prefixed with to run as this user."""
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        # the submitter's HOME (root's) is neither readable nor writable by this user
        return {**env, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def share(self, attempt_dir: Path, logs: tuple[Path, ...]) -> None:
        """Let the user add files to `attempt_dir`, once the `logs` exist there as the
        server's: made later, a symlink the user put in their place would be followed."""
        for path in logs:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
            os.close(os.open(path, flags, 0o600))
        os.chown(attempt_dir, 0, self.gid)
        os.chmod(attempt_dir, SHARED_DIR_MODE)
        # logs/ and the home above it let the user through (0711), for a pool that came with
        # a reload of velda.toml after the server made them 0700 at start
        for above in (attempt_dir.parent, attempt_dir.parent.parent):
            mode = stat.S_IMODE(os.stat(above).st_mode)
            if mode & 0o011 != 0o011:
                os.chmod(above, mode | 0o011)
        for above in attempt_dir.parent.parent.parents:
            if not self.can_enter(above):
                raise EngineError(
                    f"user {self.name} cannot enter {above}, above the state directory: "
                    f"its tasks could not record their exit status (make it 0711 or move "
                    f"VELDA_HOME)"
                )

    def can_enter(self, path: Path) -> bool:
        st = os.stat(path)
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in os.getgrouplist(self.name, self.gid):
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def task_user(pool: Pool) -> TaskUser | None:
    """The user a pool's tasks run as, or None for the server's own user. velda.toml was
    checked at start (config.py); a user removed since then is an error here."""
    name = pool.options.get("user")
    if not isinstance(name, str):
        return None
    entry = pwd.getpwnam(name)  # KeyError: the caller reports it as the task's start error
    return TaskUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
