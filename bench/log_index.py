"""What keeping the chunk index costs the server: one sampling pass over N running attempts.

Each pass stats the stdout and stderr of every running local attempt (server/sampler.py) and
appends a record for each file that grew. Prints one table: the time of a pass with nothing
written (the steady cost) and with every file grown, and the share of one core that a pass
every 50 ms takes (passes space out to keep that under 5%).

    python bench/log_index.py
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from velda.server.sampler import INTERVAL_S, MAX_SHARE, ChunkSampler


def _attempts(root: Path, n: int) -> list[Path]:
    dirs = []
    for i in range(n):
        d = root / f"{i}.1"
        d.mkdir()
        (d / "stdout").write_bytes(b"")
        (d / "stderr").write_bytes(b"")
        dirs.append(d)
    return dirs


def _pass_ms(sampler: ChunkSampler, dirs: list[Path], grow: bool, rounds: int) -> float:
    """The median time of a pass (a loaded machine makes the mean say little)."""
    times = []
    for _ in range(rounds):
        if grow:
            for d in dirs:
                with open(d / "stdout", "ab") as f:
                    f.write(b"x\n")
        times.append(sampler.sample_all())
    return 1000 * statistics.median(times)


def main() -> None:
    print("| running attempts | pass, nothing written | pass, every stdout grew "
          "| passes every | share of one core |")
    print("| --- | --- | --- | --- | --- |")
    for n in (10, 100, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            dirs = _attempts(Path(tmp), n)
            sampler = ChunkSampler()
            for d in dirs:
                sampler.watch(d)
            idle = _pass_ms(sampler, dirs, grow=False, rounds=20)
            grown = _pass_ms(sampler, dirs, grow=True, rounds=5)
            sampler.close()
        every = max(1000 * INTERVAL_S, idle / MAX_SHARE)  # as ChunkSampler spaces them
        print(f"| {n} | {idle:.2f} ms | {grown:.2f} ms | {every:.0f} ms "
              f"| {100 * idle / every:.1f}% |")


if __name__ == "__main__":
    main()
