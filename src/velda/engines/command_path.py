"""Where a task's command runs from: looked up in its PATH as a shell does, remembered a
second.

A flood of tasks runs the same few commands from the same PATH: each lookup tries every PATH
entry before the one that has it (two system calls where it is found). A shell remembers what
it found (bash's `hash`) for as long as it lives; this remembers it for `TTL_S`, so a command
installed earlier in the PATH is seen a second later at most. A command found and then removed
is not missed: its spawn fails and the engine's wrapper looks it up again, and says so.
"""

from __future__ import annotations

import os
import time

TTL_S = 1.0


class CommandPaths:
    def __init__(self, ttl_s: float = TTL_S) -> None:
        self._ttl_s = ttl_s
        self._found: dict[tuple[str, str, str], tuple[str | None, float]] = {}

    def find(self, name: str, path: str, cwd: str) -> str | None:
        """Where `name` runs from in `path` (relative entries from `cwd`); a name with a `/`
        as it is. None: not found."""
        if "/" in name:
            return name
        key = (name, path, cwd)
        now = time.monotonic()
        known = self._found.get(key)
        if known is not None and now < known[1]:
            return known[0]
        if len(self._found) > 1000:  # a thousand distinct commands a second: keep it small
            self._found.clear()
        found = look_up(name, path, cwd)
        self._found[key] = (found, now + self._ttl_s)
        return found


def look_up(name: str, path: str, cwd: str) -> str | None:
    for entry in path.split(":"):
        found = os.path.join(cwd, entry or ".", name)
        if os.access(found, os.X_OK) and os.path.isfile(found):
            return found
    return None
