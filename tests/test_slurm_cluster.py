"""The Slurm test cluster works: jobs submitted through its prefix run, see their fake GPU,
and arrays fan out. The Slurm engine's own tests build on this."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from slurm_cluster import SlurmCluster

JOB_TIMEOUT_S = 20


def sbatch(slurm: SlurmCluster, *args: str) -> str:
    result = subprocess.run([*slurm.prefix, "sbatch", "--parsable", *args], env=slurm.env,
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip().split(";")[0]


def states(slurm: SlurmCluster, job_id: str) -> list[str]:
    """The JobState of every job of `job_id` (one, or one per array task)."""
    result = subprocess.run([*slurm.prefix, "scontrol", "show", "job", "-o", job_id],
                            env=slurm.env, capture_output=True, text=True, check=True, timeout=30)
    return re.findall(r"JobState=(\S+)", result.stdout)


def wait_final(slurm: SlurmCluster, job_id: str, count: int = 1) -> list[str]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        now = states(slurm, job_id)
        done = len(now) == count and all(s not in ("PENDING", "RUNNING", "CONFIGURING",
                                                   "COMPLETING") for s in now)
        if done or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_a_job_runs_and_writes_its_output(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "hello.out"
    job = sbatch(slurm, "-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME")
    assert wait_final(slurm, job) == ["COMPLETED"]
    assert re.fullmatch(r"hello from n[12]\n", out.read_text())


def test_a_gpu_job_sees_its_device(slurm: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "gpu.out"
    job = sbatch(slurm, "--gres=gpu:1", "-o", str(out), "--wrap", "echo $CUDA_VISIBLE_DEVICES")
    assert wait_final(slurm, job) == ["COMPLETED"]
    assert out.read_text() == "0\n"


def test_an_array_writes_one_output_per_task(slurm: SlurmCluster, tmp_path: Path) -> None:
    job = sbatch(slurm, "--array=0-2", "-o", str(tmp_path / "part-%a.out"),
                 "--wrap", "echo $SLURM_ARRAY_TASK_ID")
    assert wait_final(slurm, job, count=3) == ["COMPLETED"] * 3
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        f"part-{i}.out": f"{i}\n" for i in range(3)}
