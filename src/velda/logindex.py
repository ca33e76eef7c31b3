"""The chunk index of an attempt's logs: when each stream grew.

stdout and stderr stay in two files, byte for byte. Beside them, `chunks` records when each
one grew, one line per change: `TIME STREAM END` (Unix seconds, `o` or `e`, the file's size
then). Reading the records in order and taking each stream's bytes up to END merges the two
files in the order they were written, to within the time between two records of a stream.
Bytes that no record covers yet (written since the last one, or while nobody watched) come
last, stdout before stderr.

Whoever sees the bytes land writes the records: the server, sampling the file sizes of
running local attempts (server/sampler.py), or the Ray driver, as it appends each chunk.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

INDEX = "chunks"
STREAMS = ("stdout", "stderr")
CODE = {"stdout": "o", "stderr": "e"}
_STREAM_OF = {"o": "stdout", "e": "stderr"}


# A pool's task user may add files to its attempt directory: a symlink or a FIFO named
# `chunks` must not make the server write or read elsewhere, or block (docs/security.md).
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK


def open_index(attempt_dir: Path) -> int:
    """An O_APPEND descriptor on the attempt's index: each record is one write()."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _SAFE  # private, never a link
    return _regular(os.open(attempt_dir / INDEX, flags, 0o600))


def _regular(fd: int) -> int:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{INDEX} is not a regular file")
    return fd


def record(fd: int, stream: str, end: int, at: float) -> None:
    os.write(fd, f"{at:.3f} {CODE[stream]} {end}\n".encode())


def read_records(path: Path, offset: int = 0) -> tuple[list[tuple[str, int]], int]:
    """The complete records after byte `offset` of the index, and where they end."""
    try:
        with os.fdopen(_regular(os.open(path, os.O_RDONLY | _SAFE)), "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    complete = data.rfind(b"\n") + 1
    records = []
    for line in data[:complete].splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].decode() in _STREAM_OF and parts[2].isdigit():
            records.append((_STREAM_OF[parts[1].decode()], int(parts[2])))
    return records, offset + complete


def last_sizes(attempt_dir: Path) -> dict[str, int]:
    """How far the index covers each stream."""
    sizes = dict.fromkeys(STREAMS, 0)
    for stream, end in read_records(attempt_dir / INDEX)[0]:
        sizes[stream] = max(sizes[stream], end)
    return sizes


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
