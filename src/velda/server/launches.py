"""What an engine gets to run one attempt: its directory, its environment, its Launch.

The environment is the submitter's (as stored) plus velda's own variables; what only one
engine sets (the local engine's CUDA_VISIBLE_DEVICES and VELDA_HOME) that engine adds itself.
"""

from __future__ import annotations

from pathlib import Path

from velda.engines.base import Launch
from velda.models import Pool, Task


def attempt_dir(home: Path, task_id: int, attempt: int) -> Path:
    """One directory per attempt, straight under logs/: one mkdir per start."""
    return home / "logs" / f"{task_id}.{attempt}"


def make_attempt_dir(path: Path) -> bool:
    """Whether it made it (False: it was there, made ahead or by an earlier try)."""
    try:
        path.mkdir(mode=0o700)  # logs are the server's alone (docs/security.md)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def task_env(
    task: Task, pool: Pool, stored: dict[str, str], server_url: str, token: str
) -> dict[str, str]:
    env = dict(stored)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a task's output is a file: stream it anyway
    cpus = task.alloc.cpus if task.alloc else pool.resources.cpus
    own_url = pool.options.get("server_url")  # how this pool's nodes reach the server
    env.update(
        VELDA_TASK_ID=str(task.id), VELDA_TASK_NAME=task.name or "", VELDA_POOL=task.pool,
        VELDA_ATTEMPT=str(task.attempt), VELDA_SERVER=str(own_url or server_url),
        VELDA_TOKEN=token,
        OMP_NUM_THREADS=str(max(1, int(cpus))),
    )
    if task.shard_id is not None:
        env["VELDA_SHARD_ID"] = str(task.shard_id)
        env["VELDA_TOTAL_SHARDS"] = str(task.total_shards)
    return env


def launch_of(task: Task, pool: Pool, env: dict[str, str], directory: Path, home: Path) -> Launch:
    return Launch(
        task_id=str(task.id), attempt=task.attempt, argv=task.command, cwd=task.cwd, env=env,
        pool=pool, gpu_ids=task.alloc.gpu_ids if task.alloc else (), attempt_dir=directory,
        stdout_path=directory / "stdout", stderr_path=directory / "stderr",
        timeout_s=task.timeout_s,
        parent_id=None if task.parent_id is None else str(task.parent_id),
        shard_id=task.shard_id, server_home=home, terminal=task.terminal,
    )
