"""The example pipelines of examples/ml-pipeline, as the tests run them: a writable copy, its
data, and what a finished run must show. Shared by the tests that run them on the local engine
(test_examples.py), on Ray pools (test_ray_pools.py) and on Slurm pools (test_slurm_pools.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from velda_cli import Velda

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ml-pipeline"


def copy_examples(dest: Path) -> Path:
    """A writable copy of the example pipelines at `dest` (the sources may be read-only)."""
    shutil.copytree(EXAMPLES, dest)
    for path in [dest, *dest.iterdir()]:
        path.chmod(path.stat().st_mode | 0o200)
    return dest


@contextmanager
def examples_as_cwd(velda: Velda, dest: Path) -> Iterator[Path]:
    """A writable copy of the example pipelines at `dest`, as `velda`'s current directory
    until the block ends (for a `velda` that other tests share)."""
    home = velda.cwd
    velda.cwd = copy_examples(dest)
    try:
        yield velda.cwd
    finally:
        velda.cwd = home


def parse_time(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def make_data(velda: Velda, n: int = 8) -> None:
    velda.run("python", "make_data.py", str(n), check=True)


def run_linear(velda: Velda, example: Path, timeout: float = 60) -> list[dict[str, Any]]:
    """linear.sh ran to SUCCESS: process, then train once it succeeded, then evaluate, whose
    model fits the data. Returns the three tasks."""
    make_data(velda)
    ids = velda.run("./linear.sh", check=True).stdout.split()
    assert len(ids) == 3
    process, train, evaluate = tasks = [velda.wait(i, timeout=timeout) for i in ids]
    assert [t["status"] for t in tasks] == ["SUCCESS"] * 3
    assert [t["pool"] for t in tasks] == ["cpu-2", "gpu-1", "cpu-1"]
    assert parse_time(train["started_at"]) >= parse_time(process["finished_at"])
    assert parse_time(evaluate["started_at"]) >= parse_time(train["finished_at"])
    assert train["depends_on"] == [{"id": process["id"], "kind": "success"}]
    assert "evaluation passed" in velda.log(evaluate["id"]).stdout
    a, b = (float(v) for v in (example / "model.txt").read_text().split())
    assert abs(a - 3) < 0.1 and abs(b - 2) < 0.3
    return tasks


def assert_recursive_succeeded(velda: Velda, root_id: str, example: Path,
                               files: int) -> list[list[dict[str, Any]]]:
    """recursive.sh ran to SUCCESS: one child per file, each with its inference and then its
    evaluation (which depends on it) and the evaluation's output. Returns each child's steps."""
    files_done = velda.children(root_id)
    assert len(files_done) == files
    steps_of = []
    for child in files_done:
        steps = velda.children(child["id"])
        assert [s["name"] for s in steps] == ["inference", None]
        inference, evaluation = steps
        assert evaluation["depends_on"] == [{"id": inference["id"], "kind": "success"}]
        assert all(s["status"] == "SUCCESS" for s in steps)
        assert "MAE" in velda.log(evaluation["id"]).stdout
        steps_of.append(steps)
    assert sorted(p.name for p in (example / "eval").iterdir()) == [
        f"part-{i:02d}.csv.txt" for i in range(files)
    ]
    return steps_of
