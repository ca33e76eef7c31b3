"""Where a user's velda state lives. Plain strings and os.path: every command imports this,
and pathlib alone costs a few milliseconds of each `vbatch`."""

from __future__ import annotations

import os

DEFAULT_PORT = 7411


def velda_home() -> str:
    home = os.environ.get("VELDA_HOME")
    if home:
        return home
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(data, "velda")


def server_file(home: str | os.PathLike[str]) -> str:
    """Written by a running server: its URL and PID."""
    return os.path.join(home, "server.json")


def token_file(home: str | os.PathLike[str]) -> str:
    return os.path.join(home, "token")
