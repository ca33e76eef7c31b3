"""What each attempt uses: CPU time, CPU %, memory, and its GPUs (local pools; a Ray node
sends its own samples into the same files, see engines/proc_tree.py).

The server samples it from /proc, with no process of its own per task: every INTERVAL_S, for
each running attempt, it walks the process tree under the attempt's wrapper (the leader of the
attempt's session, `handle["pid"]`) through /proc/PID/task/TID/children and reads each
process's /proc/PID/stat. A sample is the tree's CPU time (user and system, its own plus what
its processes reaped), its resident memory (the sum of the tree's RSS) and its process count,
and on a GPU pool each of its devices' utilisation and memory from NVML (gpu_usage.py). Each
sample is one JSON line appended to the attempt's `usage` file, which the task page charts.

The first sample of an attempt comes with the first pass after it started, so a task that
ends sooner (a flood of `true`) costs no sample and no file. At the end the exact CPU totals
come from the status-file wrapper, which writes its shell's `times` into the attempt's `status`
file, ahead of the exit status, as it exits (status_file.py); those of a task the server
spawned itself are read from its zombie with its exit status (engines/zombie.py), and a Ray
node sends its attempt's with its exit status, and they are stored with the exit, as is when
it started (an older velda's Ray attempt has them in a `times` file). The summary of an
ended attempt (the `usage` object of the API, docs/api.md) is made from those when it is
first asked for and, if it was sampled, kept in `usage.json` beside its files (one without
samples is made again from what the store keeps, and its folder may go to the next attempt:
engines/spare_folders.py). An attempt adopted after a restart continues its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velda.engines.proc_tree import SAMPLES, sample_line, tree_figures
from velda.engines.status_file import STATUS, read_status, read_times, wrapper_started
from velda.models import Task
from velda.server import gpu_usage
from velda.server.paced import PacedPasses
from velda.store.base import AttemptRecord, Store

INTERVAL_S = 1.0
MAX_SHARE = 0.02  # of the event loop's time that sampling may take
SUMMARY = "usage.json"  # the attempt's totals, written when it ended


@dataclass
class Sample:
    t: float
    user_s: float
    system_s: float
    rss: int  # bytes, the whole tree
    procs: int
    gpus: list[dict[str, Any]] = field(default_factory=list)

    def line(self) -> str:
        return sample_line(self.t, (self.user_s, self.system_s, self.rss, self.procs),
                           self.gpus)


def sample_tree(leader: int, at: float) -> Sample | None:
    """The tree of processes under `leader` as /proc shows it now; None once it is gone."""
    figures = tree_figures(leader)
    return None if figures is None else Sample(at, *figures)


class _Watched:
    """One running attempt: where its samples go and what they said so far."""

    def __init__(self, attempt_dir: Path, leader: int, gpu_ids: tuple[int, ...],
                 fresh: bool) -> None:
        self.dir = attempt_dir
        self.leader = leader
        self.gpu_ids = gpu_ids
        # an adopted attempt continues its file
        earlier = [] if fresh else read_samples(attempt_dir)
        self.last = earlier[-1] if earlier else None
        self.previous: Sample | None = earlier[-2] if len(earlier) > 1 else None
        self.peak_rss = max((s.rss for s in earlier), default=0)
        self.peak_gpu = _gpu_peaks(earlier)
        self.samples = len(earlier)

    def sample(self, at: float) -> None:
        sample = sample_tree(self.leader, at)
        if sample is None:
            return
        if self.gpu_ids:
            sample.gpus = gpu_usage.devices(self.gpu_ids)
        self.previous, self.last = self.last, sample
        self.peak_rss = max(self.peak_rss, sample.rss)
        for gpu in sample.gpus:
            index = gpu["index"]
            self.peak_gpu[index] = max(self.peak_gpu.get(index, 0), gpu["memory_bytes"])
        self.samples += 1
        _append(self.dir / SAMPLES, sample.line())

    def summary(self) -> dict[str, Any]:
        """While it runs (an ended attempt's is made from its files and the store)."""
        return summarise(None, self.previous, self.last, self.samples, self.peak_rss,
                         self.peak_gpu, None, None)


class UsageSampler:
    """Samples the running local attempts it was told of, every INTERVAL_S."""

    def __init__(self, now: Callable[[], float] = time.time,
                 interval: float = INTERVAL_S) -> None:
        self.now = now
        self._watched: dict[Path, _Watched] = {}
        self._passes = PacedPasses(interval, MAX_SHARE, self.sample_all,
                                   lambda: bool(self._watched))

    def watch(self, attempt_dir: Path, leader: int, gpu_ids: tuple[int, ...] = (),
              fresh: bool = False) -> None:
        """`fresh`: no samples of it were written before."""
        if attempt_dir in self._watched:
            return
        self._watched[attempt_dir] = _Watched(attempt_dir, leader, gpu_ids, fresh)
        self._passes.start()  # the first sample comes with the next pass

    def unwatch(self, attempt_dir: Path) -> None:
        """The attempt ended: its summary is made from its files when it is first asked for
        (usage_of), not here, so that a flood of short tasks costs no write per task."""
        self._watched.pop(attempt_dir, None)

    def live(self, attempt_dir: Path) -> dict[str, Any] | None:
        """The usage of a running attempt, as its last samples say; None if not watched."""
        watched = self._watched.get(attempt_dir)
        return None if watched is None else watched.summary()

    def sample_all(self) -> float:
        """One pass; how long it took (seconds)."""
        start = time.perf_counter()
        at = self.now()
        for watched in list(self._watched.values()):
            with contextlib.suppress(OSError):
                watched.sample(at)
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop: the attempts run on, and the next server continues their files."""
        self._passes.stop()
        self._watched.clear()


def usage_of(attempt_dir: Path, sampler: UsageSampler, ended_at: float | None,
             stored: Callable[[], AttemptRecord | None] = lambda: None,
             ) -> dict[str, Any] | None:
    """An attempt's `usage` object: live while the sampler watches it, else its summary
    (made now from its files, and kept, if it ended, at `ended_at`, while no server
    watched). `stored`: what the store keeps of the attempt, asked only for a summary of
    a task started without the wrapper (which writes when it started and its CPU totals);
    a task the server spawned itself has its start and its CPU totals there."""
    live = sampler.live(attempt_dir)
    if live is not None:
        return live
    with contextlib.suppress(OSError, ValueError, TypeError):
        return dict(json.loads(_read(attempt_dir / SUMMARY)))
    samples = read_samples(attempt_dir)
    started, times = wrapper_started(attempt_dir), read_times(attempt_dir)
    if started is None or times is None:  # started without the wrapper, or still running
        record = stored()
        if record is not None:
            started = record.started_at if started is None else started
            times = record.cpu if times is None else times
    if not samples and times is None:
        return None  # not a local attempt, or it never ran
    if started is None and samples:
        started = samples[0].t  # a Ray node samples at once
    summary = summarise(started,
                        samples[-2] if len(samples) > 1 else None,
                        samples[-1] if samples else None, len(samples),
                        max((s.rss for s in samples), default=0), _gpu_peaks(samples), times,
                        _ended_at(attempt_dir) or ended_at)
    if summary["final"] and samples:  # kept where it saves reading them again
        _write_summary(attempt_dir, summary)
    return summary


def summarise(started: float | None, previous: Sample | None, last: Sample | None,
              samples: int, peak_rss: int, peak_gpu: dict[int, int],
              times: tuple[float, float] | None, ended_at: float | None) -> dict[str, Any]:
    """The `usage` object (docs/api.md): CPU seconds, CPU % now (or, once it ended, over the
    whole attempt, from `started` to `ended_at`), memory now and at its peak, each GPU's last
    figures and peak memory."""
    final = ended_at is not None
    user, system = times if times is not None else (
        (last.user_s, last.system_s) if last is not None else (0.0, 0.0))
    if ended_at is not None:
        span = ended_at - started if started is not None else 0.0
        percent = 100 * (user + system) / span if span > 0 else None
    elif previous is not None and last is not None and last.t > previous.t:
        used = last.user_s + last.system_s - previous.user_s - previous.system_s
        percent = 100 * max(used, 0.0) / (last.t - previous.t)
    else:
        percent = None
    gpus = [{**gpu, "peak_memory_bytes": peak_gpu.get(gpu["index"], gpu["memory_bytes"])}
            for gpu in (last.gpus if last is not None else [])]
    return {
        "cpu_user_s": round(user, 3),
        "cpu_system_s": round(system, 3),
        "cpu_s": round(user + system, 3),
        "cpu_percent": None if percent is None else round(percent, 1),
        "memory_bytes": None if final or last is None else last.rss,
        "peak_memory_bytes": peak_rss if samples else None,
        "processes": None if final or last is None else last.procs,
        "samples": samples,
        "gpus": gpus,
        "final": final,
    }


def chart(attempt_dir: Path) -> list[dict[str, Any]]:
    """The attempt's samples as the task page draws them: time, CPU % since the sample
    before, memory, and each GPU's utilisation and memory."""
    points = []
    previous: Sample | None = None
    for sample in read_samples(attempt_dir):
        percent = None
        if previous is not None and sample.t > previous.t:
            used = sample.user_s + sample.system_s - previous.user_s - previous.system_s
            percent = round(100 * max(used, 0.0) / (sample.t - previous.t), 1)
        points.append({"t": sample.t, "cpu_percent": percent, "memory_bytes": sample.rss,
                       "gpus": sample.gpus})
        previous = sample
    return points


def read_samples(attempt_dir: Path) -> list[Sample]:
    """The attempt's samples, in order; a line cut short by a crash is left out."""
    try:
        text = _read(attempt_dir / SAMPLES).decode(errors="replace")
    except OSError:
        return []
    samples = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            samples.append(Sample(float(data["t"]), float(data["user_s"]),
                                  float(data["system_s"]), int(data["rss"]),
                                  int(data["procs"]), list(data.get("gpus", []))))
        except (ValueError, KeyError, TypeError):
            continue
    return samples


def _gpu_peaks(samples: list[Sample]) -> dict[int, int]:
    peaks: dict[int, int] = {}
    for sample in samples:
        for gpu in sample.gpus:
            peaks[gpu["index"]] = max(peaks.get(gpu["index"], 0), gpu["memory_bytes"])
    return peaks


def _ended_at(attempt_dir: Path) -> float | None:
    """When the attempt's wrapper wrote its exit status; None while it runs (or if the
    wrapper was killed before it could)."""
    path = attempt_dir / STATUS
    if read_status(attempt_dir) is None:  # blank until the command ends
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _write_summary(attempt_dir: Path, summary: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        _append(attempt_dir / SUMMARY, json.dumps(summary), truncate=True)


# The attempt directory of a pool that runs as another user is shared with that user
# (run_as.py): never follow a link found there, never block on a FIFO, write regular files only.
_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK


def _append(path: Path, text: str, truncate: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | _SAFE | (os.O_TRUNC if truncate else os.O_APPEND)
    fd = os.open(path, flags, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _SAFE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class SubtreeUsage:
    """What every attempt of every task below a parent used, summed. A parent's page asks for
    it every second and the sum reads a file per attempt below: a sum is kept until the
    parent changes state, and for at most TTL_S while its subtree runs."""

    TTL_S = 2.0
    KEPT = 1000  # parents

    def __init__(self, store: Store,
                 measure: Callable[[int, int, float | None], dict[str, Any] | None]) -> None:
        self.store = store
        self.measure = measure  # (task ID, attempt, when it ended) -> its usage
        self._kept: dict[tuple[int, str, float | None], tuple[float, dict[str, Any] | None]] = {}

    def of(self, task: Task) -> dict[str, Any] | None:
        """None for a task without children."""
        key = (task.id, task.status.value, task.resolved_at)
        now = time.monotonic()
        kept = self._kept.get(key)
        if kept is not None and (task.status.is_final() or now - kept[0] < self.TTL_S):
            return kept[1]
        if len(self._kept) >= self.KEPT:
            self._kept.clear()
        totals = self._sum(task)
        self._kept[key] = (now, totals)
        return totals

    def _sum(self, task: Task) -> dict[str, Any] | None:
        ids = [i for i in self.store.subtree_ids(task.id) if i != task.id]
        if not ids:
            return None
        measured = []
        for sub in self.store.get_many(ids):
            for attempt in range(1, sub.attempt + 1):
                ended = sub.finished_at if attempt == sub.attempt else sub.started_at
                found = self.measure(sub.id, attempt, ended)
                if found is not None:
                    measured.append(found)
        return subtree_totals(measured)


def subtree_totals(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """What a parent's subtree used: CPU seconds summed, the largest peak of memory."""
    return {
        "cpu_user_s": round(sum(u["cpu_user_s"] for u in usages), 3),
        "cpu_system_s": round(sum(u["cpu_system_s"] for u in usages), 3),
        "cpu_s": round(sum(u["cpu_s"] for u in usages), 3),
        "peak_memory_bytes": max((u["peak_memory_bytes"] or 0 for u in usages), default=None),
        "attempts": len(usages),
    }
