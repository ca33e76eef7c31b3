"""A real two-node Ray cluster on loopback, as a pytest fixture (tests/conftest.py imports it).

The cluster runs in a child process (this file run as a script), so the test process never
imports Ray: its threads, signal handlers and warnings stay out of pytest. The head declares
one GPU (Ray accepts declared GPUs without real ones); the second node declares the custom
resource `node2_slot`, so a task that asks for it lands there. Started once per test session.
Tests that use it are skipped, saying why, only when Ray is not installed.

    def test_x(ray_cluster: RayCluster) -> None:
        ray_cluster.address      # host:port of the head's GCS
        ray_cluster.node2_id     # Ray node ID of the second node
        ray_cluster.root         # its temp root, new at each start: /tmp/ray is never used
        ray_cluster.kill_node2() # kill -9 its raylet (reaped), then add a fresh second node

`start_cluster(single=True)` starts a throwaway one-node cluster whose GCS a test may kill
(`kill_gcs()`: the head is gone for drivers, while the node's work runs on).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import pytest

from conftest import missing

START_TIMEOUT_S = 120
OBJECT_STORE_BYTES = 150 * 1024 * 1024  # Ray's minimum is ~75 MB; default would be 30% of RAM
HEAD = {"num_cpus": 2, "num_gpus": 1}
NODE2 = {"num_cpus": 2, "resources": {"node2_slot": 1}}


@dataclass
class RayCluster:
    address: str
    head_id: str
    node2_id: str
    root: str  # the cluster's own temp root, new for each start (Ray's default is /tmp/ray)
    proc: subprocess.Popen[str]

    def kill_node2(self) -> str:
        """kill -9 the second node's raylet, then add a new second node; returns the ID of
        the node that was killed."""
        killed = self.node2_id
        self.node2_id = self._ask("kill-node2")
        return killed

    def kill_gcs(self) -> None:
        """kill -9 the head's GCS server."""
        self._ask("kill-gcs")

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # Ray's daemons share the cluster process's group; a raylet killed by a test leaves
        # its agents behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return _answer(self.proc, START_TIMEOUT_S)


def _answer(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("ok "):
        proc.kill()
        raise RuntimeError(f"the Ray test cluster did not answer ({line.strip() or 'no answer'})"
                           "; see its output above")
    return line[3:].strip()


def start_cluster(single: bool = False) -> RayCluster:
    """Start a cluster (skip the test if Ray is not installed); the caller stops it."""
    if importlib.util.find_spec("ray") is None:
        missing("ray is not installed (pip install 'ray[default]')")
    proc = subprocess.Popen(
        [sys.executable, __file__, *(["--single"] if single else [])], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    address, head_id, node2_id, root = _answer(proc, START_TIMEOUT_S).split()
    return RayCluster(address, head_id, node2_id, root, proc)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------- the cluster process


def _add_node2(cluster: Any) -> Any:
    return cluster.add_node(**NODE2, object_store_memory=OBJECT_STORE_BYTES)


def _serve(out: IO[str], single: bool) -> None:
    root = tempfile.mkdtemp(prefix="vray-", dir="/tmp")  # short: Ray's socket paths
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    # Ray's default temp dir ($RAY_TMPDIR/ray) is where ray.cluster_utils writes
    # ray_current_cluster, whatever temp_dir says; by default that is /tmp/ray or
    # $TMPDIR/ray, which exist only where Ray ran before. A fresh root for every run
    # keeps the cluster off anything an earlier run left behind.
    os.environ["RAY_TMPDIR"] = root
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        **({"num_cpus": 1} if single else HEAD), "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False, "temp_dir": temp_dir,
    })
    head: Any = cluster.head_node
    node2 = None if single else _add_node2(cluster)
    cluster.wait_for_nodes()
    node2_id = node2.node_id if node2 else "-"
    _say(out, f"{cluster.address} {head.node_id} {node2_id} {root}")
    gcs_killed = False
    try:
        for line in sys.stdin:
            if line.strip() == "kill-node2" and node2 is not None:
                node2.kill_raylet()  # SIGKILL, and reaped: a zombie raylet looks alive
                cluster.remove_node(node2, allow_graceful=False)
                node2 = _add_node2(cluster)
                _say(out, node2.node_id)
            elif line.strip() == "kill-gcs":
                head.kill_gcs_server()
                gcs_killed = True
                _say(out, "killed")
    finally:
        _shutdown(cluster, gcs_killed)
        shutil.rmtree(root, ignore_errors=True)


def _say(out: IO[str], text: str) -> None:
    out.write(f"ok {text}\n")
    out.flush()


def _shutdown(cluster: Any, gcs_killed: bool) -> None:
    if not gcs_killed:
        cluster.shutdown()
        return
    for node in cluster.list_all_nodes():  # a graceful shutdown would wait for the dead GCS
        node.kill_all_processes(check_alive=False, allow_graceful=False)


if __name__ == "__main__":
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps every address on loopback
    started = time.monotonic()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Ray's chatter goes to stderr; stdout carries the answers only
    _serve(answers, "--single" in sys.argv)
    print(f"ray test cluster: up for {time.monotonic() - started:.0f} s", file=sys.stderr)
