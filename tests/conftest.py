"""Shared fixtures. End-to-end tests drive the installed commands against a real server that
runs in a temporary VELDA_HOME; see velda_cli.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines import EXAMPLES, copy_examples
from slurm_cluster import SlurmCluster, missing_tools, searchable_tmpdir
from velda_cli import Velda

pytest_plugins = ["browser", "ray_cluster"]


@pytest.fixture
def velda(tmp_path: Path) -> Iterator[Velda]:
    """A private velda: its own home, its own server (started by the first command)."""
    v = Velda(tmp_path / "home", tmp_path / "work")
    try:
        yield v
    finally:
        v.shutdown()


@pytest.fixture
def example(tmp_path: Path, velda: Velda) -> Path:
    """A writable copy of the example pipeline, with its velda.toml in force."""
    if not EXAMPLES.is_dir():
        pytest.skip(f"the example pipelines are not at {EXAMPLES}")
    dest = copy_examples(tmp_path / "ml-pipeline")
    velda.env["VELDA_CONFIG"] = str(dest / "velda.toml")
    velda.cwd = dest
    return dest


def missing(what: str) -> None:
    """Skip a test whose tool is not installed here; in CI, where scripts/test.sh installs
    everything, fail instead: CI must never skip what it can install."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}, although scripts/test.sh installs it")
    pytest.skip(what)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A real two-node Slurm cluster on loopback (see slurm_cluster.py), one per session;
    run clients as `[*slurm.prefix, "sbatch", ...]` with `env=slurm.env`."""
    absent = missing_tools()
    if absent:
        missing(f"the Slurm tests need {', '.join(absent)}"
                " (apt-get install slurm-wlm munge iproute2)")
    if os.geteuid() != 0:
        missing("the Slurm tests need root (their daemons run in a network namespace)")
    root = tempfile.mkdtemp(prefix="vslurm-", dir=searchable_tmpdir())
    cluster = SlurmCluster()
    try:
        cluster.start(Path(root))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
