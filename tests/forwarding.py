"""Forwarded ports from the tests' side: a task serving HTTP, `velda task port-forward` to it,
and GETs through the forward (test_ports.py on local and Ray pools, test_slurm_pools.py on
Slurm). A `Velda` with a prefix (a network namespace) runs the forwarder, and so the GETs to
the port it listens on, inside that namespace."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from velda_cli import Velda, default_signals, free_port

_GET = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10)" \
       ".read().decode(), end='')"


def serve(velda: Velda, port: int, *pool: str, bind: str = "127.0.0.1") -> str:
    """A running task serving its working directory over HTTP on `port`."""
    (velda.cwd / "hello.txt").write_text("hi\n")
    task_id = velda.vbatch("-q", *pool, "python3", "-m", "http.server", str(port), "--bind",
                           bind)
    velda.wait(task_id, until={"RUNNING"})
    return task_id


@contextmanager
def port_forward(
    velda: Velda, *argv: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*velda.prefix, "velda", "task", "port-forward", *argv], cwd=velda.cwd,
        env={**velda.env, **(env or {})}, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=default_signals,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=10)


def get(url: str, timeout: float = 30, prefix: Sequence[str] = ()) -> str:
    """GET url (from inside `prefix`'s namespace, if one is given), asked again while the
    forward or the task's server is not up yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get_once(url, prefix)
        except (OSError, urllib.error.URLError, subprocess.SubprocessError) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"GET {url}: {e}") from e
            time.sleep(0.2)


def _get_once(url: str, prefix: Sequence[str]) -> str:
    if not prefix:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    result = subprocess.run([*prefix, sys.executable, "-c", _GET, url], capture_output=True,
                            text=True, timeout=20, check=True)
    return result.stdout


def forwarded(velda: Velda, task_id: str) -> list[dict[str, Any]]:
    return list(velda.get(task_id)["forwarded_ports"])


def wait_forwarded(velda: Velda, task_id: str, expected: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + 15
    while (found := forwarded(velda, task_id)) != expected:
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def check_forward(velda: Velda, task_id: str, port: int) -> None:
    """port-forward PORT:LOCAL serves the task's listing while it runs, shown in its JSON;
    stopped, it is gone from the JSON."""
    local = free_port()
    with port_forward(velda, task_id, f"{port}:{local}") as proc:
        listing = get(f"http://127.0.0.1:{local}/", prefix=velda.prefix)
        assert "hello.txt" in listing and "Directory listing" in listing
        assert get(f"http://127.0.0.1:{local}/hello.txt", prefix=velda.prefix) == "hi\n"
        wait_forwarded(velda, task_id, [{"port": port, "local": local}])
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"forwarding http://127.0.0.1:{local} -> task {task_id} port {port}" in err
    wait_forwarded(velda, task_id, [])
