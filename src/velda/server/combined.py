"""One attempt's stdout and stderr merged in the order they were written.

The two files stay apart byte for byte; the attempt's chunk index (velda/logindex.py) says in
which order their pieces landed. The merged stream is the same for every reader and only
grows: while the attempt runs it holds what the index covers; once the attempt has ended,
what the index does not cover follows, stdout first. So a reader can resume at any offset of
it (the web page polls that way), and `skip` gets there from the index alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from velda.logindex import INDEX, STREAMS, file_size, last_sizes, read_records

CHUNK = 1 << 20
Piece = tuple[str, bytes]  # ("stdout" | "stderr", bytes)
_KEPT = 256  # where recent readers stopped, so that the next poll need not walk the index


class _Place:
    def __init__(self, combined: Combined) -> None:
        self.pos = dict(combined.pos)
        self.index_offset = combined.index_offset
        self.pending = list(combined.pending)


_places: dict[tuple[Path, int], _Place] = {}


class Combined:
    def __init__(self, attempt_dir: Path) -> None:
        self.dir = attempt_dir
        self.pos = dict.fromkeys(STREAMS, 0)  # how far each file has been served
        self.index_offset = 0
        self.pending: list[tuple[str, int]] = []  # records read but not yet served
        self.files: dict[str, BinaryIO] = {}

    def read(self, to_end: bool) -> list[Piece]:
        """The next pieces, up to about CHUNK bytes: those the index orders, then (once the
        attempt has ended: to_end) what it does not cover."""
        pieces: list[Piece] = []
        size = 0
        while size < CHUNK and self._refill():
            stream, end = self.pending[0]
            data = self._take(stream, min(end - self.pos[stream], CHUNK - size))
            if data:
                pieces.append((stream, data))
                size += len(data)
            if self.pos[stream] >= end or not data:
                self.pending.pop(0)
        if pieces or not to_end:
            return pieces
        for stream in STREAMS:
            data = self._take(stream, CHUNK)
            if data:
                return [(stream, data)]
        return []

    def skip(self, n: int, to_end: bool) -> int:
        """Move `n` bytes on without reading them; what is left of n when the stream
        has no more yet."""
        while n > 0 and self._refill():
            stream, end = self.pending[0]
            real_end = min(end, file_size(self.dir / stream))
            step = max(0, min(real_end - self.pos[stream], n))
            self.pos[stream] += step
            n -= step
            if self.pos[stream] >= real_end:
                self.pending.pop(0)
        for stream in STREAMS if to_end else ():
            step = max(0, min(file_size(self.dir / stream) - self.pos[stream], n))
            self.pos[stream] += step
            n -= step
        return n

    def length(self, to_end: bool) -> int:
        """How long the merged stream is now."""
        if to_end:
            return sum(file_size(self.dir / stream) for stream in STREAMS)
        covered = last_sizes(self.dir)
        return sum(min(covered[s], file_size(self.dir / s)) for s in STREAMS)

    @classmethod
    def at(cls, attempt_dir: Path, offset: int, to_end: bool) -> tuple[Combined, int]:
        """A reader `offset` bytes into the merged stream, resumed where an earlier reader
        stopped there if one did; and what is left of offset to skip."""
        combined = cls(attempt_dir)
        place = _places.get((attempt_dir, offset))
        if place is None:
            return combined, combined.skip(offset, to_end)
        combined.pos, combined.index_offset = dict(place.pos), place.index_offset
        combined.pending = list(place.pending)
        return combined, 0

    def remember(self, offset: int) -> None:
        """This reader stopped `offset` bytes into the merged stream."""
        if len(_places) >= _KEPT:
            del _places[next(iter(_places))]
        _places[(self.dir, offset)] = _Place(self)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _refill(self) -> bool:
        if not self.pending:
            self.pending, self.index_offset = read_records(self.dir / INDEX, self.index_offset)
        return bool(self.pending)

    def _take(self, stream: str, n: int) -> bytes:
        if n <= 0:
            return b""
        f = self.files.get(stream)
        if f is None:
            try:
                f = self.files[stream] = open(self.dir / stream, "rb")
            except FileNotFoundError:
                return b""
        f.seek(self.pos[stream])
        data = f.read(min(n, CHUNK))
        self.pos[stream] += len(data)
        return data
