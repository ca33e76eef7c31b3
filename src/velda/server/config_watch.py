"""velda.toml while the server runs: which file it reads, what it read, and changes to it.

The server looks at the file's modification time every second (one stat) and reads it again
when it changed; `velda server reload` (POST /api/v1/server/reload) reads it at once. A file
that cannot be used is refused with tomllib's line and reason, and the pools read before stay
in force, so a typo never takes pools away from running work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velda.config import Config, ConfigError, load_config
from velda.models import Pool

log = logging.getLogger("velda.server")
POLL_S = 1.0


@dataclass
class _Read:
    mtime: tuple[int, int] | None
    at: float


class ConfigWatcher:
    def __init__(self, path: Path, config: Config, apply: Callable[[Config], None]) -> None:
        self.path = path
        self.config = config
        self.apply = apply
        self.error: str | None = None
        self.read = _Read(_mtime(path), time.time())
        self._task: asyncio.Task[None] | None = None

    def poll(self) -> None:
        if _mtime(self.path) != self.read.mtime:
            self.reload()

    def reload(self) -> str | None:
        """Read the file again and apply it; the reason it was refused, or None."""
        mtime = _mtime(self.path)
        try:
            config = load_config(self.path if mtime is not None else None)
        except ConfigError as e:
            self.error = str(e)
            self.read.mtime = mtime  # told once per change, not every second
            log.warning("config refused, the pools read before stay: %s", e)
            return self.error
        self.config, self.error, self.read = config, None, _Read(mtime, time.time())
        self.apply(config)
        log.info("config read from %s: pools %s", self.path, ", ".join(config.pools) or "none")
        return None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            self.poll()

    def describe(self) -> dict[str, Any]:
        """What `velda server status` shows."""
        return {
            "path": str(self.path),
            "exists": self.path.exists(),
            "read_at": self.read.at,
            "error": self.error,
            "default_pool": self.config.default_pool,
            "pools": {name: pool_json(pool) for name, pool in self.config.pools.items()},
        }


def pool_json(pool: Pool) -> dict[str, Any]:
    r = pool.resources
    return {
        "engine": pool.engine, "cpus": r.cpus, "gpus": r.gpus, "memory_mb": r.memory_mb,
        **dict(r.custom), "capacity": pool.capacity,
    }


def _mtime(path: Path) -> tuple[int, int] | None:
    """When the file last changed, and its size (two saves within a clock tick differ)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
