"""Where a user's velda state lives. Light: imported by every command."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PORT = 7411


def velda_home() -> Path:
    home = os.environ.get("VELDA_HOME")
    if home:
        return Path(home)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data) / "velda"


def server_file(home: Path) -> Path:
    """Written by a running server: its URL and PID."""
    return home / "server.json"


def token_file(home: Path) -> Path:
    return home / "token"
