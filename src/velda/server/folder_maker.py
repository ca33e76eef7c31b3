"""The folder maker: the helper process of folders_ahead.py, which makes the attempt folders
and empty log files named on its stdin, as a start makes them (launches.py, and the log files
the local engine opens: a 0700 folder, 0600 files opened for appending).

The standard library only, so that it starts in the time of a bare `python`: 0.01 s and
9.5 MB, where importing the server's modules took 0.05 s and 16 MB.

    python -m velda.server.folder_maker     (reads folder paths, one a line, until EOF)
"""

from __future__ import annotations

import os

_LOG_FILES = (b"stdout", b"stderr")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def make(folder: bytes) -> None:
    """An attempt's folder and its empty log files, as a start makes them (launches.py)."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:  # no logs/ yet: the server's first start makes it
        return
    for name in _LOG_FILES:
        os.close(os.open(os.path.join(folder, name), _FLAGS, 0o600))


def main() -> int:
    """Make each folder named on stdin, until it closes. One that cannot be made is left
    to its start, which says why if it cannot make it either."""
    pending = b""
    while data := os.read(0, 65536):
        *folders, pending = (pending + data).split(b"\n")
        for folder in folders:
            try:
                make(folder)
            except OSError:
                continue
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
