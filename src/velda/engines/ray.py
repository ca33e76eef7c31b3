"""The Ray engine: each attempt of a task runs as one Ray task on an existing cluster.

Three places, three processes, three modules:

- `RayEngine` (here) lives in the velda server. It never imports Ray: a Ray driver calls
  `_exit` on its own process when the cluster's head has been gone for 60 s, can hang in
  `ray.init`, and costs ~100 MB. So the engine starts a **bridge**, a child process that is
  the Ray driver of the pool, and talks to it through JSON lines on its stdin and stdout. If
  the bridge dies, the engine reports its attempts `lost` and starts a new bridge on the next
  call.
- The bridge (ray_bridge.py) submits each attempt as one plain Ray task, writes the output
  the node sends back to the attempt's log files, records the attempt in `ray.json` in the
  attempt directory, and watches the head and each running attempt's node.
- On the node, `ray_node.run_attempt` (standard library and ray only: it is pickled by value,
  so nodes need no velda install) runs the argv as a process group. A short command's whole
  record (start, output, usage, exit) is the Ray task's return value; a longer one streams
  it to the bridge over TCP as it comes. A small TCP control port on the node takes
  signals, cancels, and CPU lending.

When the server stops or dies, its bridge cancels what Ray has not started yet and lets the
running attempts finish, still writing their logs and `ray.json`, then exits. The next
server's `adopt` reads `ray.json`: an ended attempt is reported, a running one is watched
through the file (and signalled through its control port) until it ends, and one that never
started goes back to the queue.

Limit: the server machine must be a Ray node (the driver needs a local raylet); `ray://`
Ray Client addresses are not supported. Users' side of all this: docs/engines.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velda.engines.base import (
    EngineError,
    EngineEvents,
    Handle,
    Launch,
    NotStartedError,
    StartResult,
)
from velda.engines.pids import same_process
from velda.models import Exit, Pool, Reason, Resources

log = logging.getLogger("velda.engines.ray")

STATE_FILE = "ray.json"
_BRIDGE_CMD = "from velda.engines.ray_bridge import bridge_main; bridge_main()"
_PROBE_TIMEOUT_S = 2.0
ADOPT_POLL_S = 0.5
_STATE_READS = 20  # a write halfway is over in microseconds
_WORKDIRS = ("shared", "upload")

Control = tuple[str, int, str]  # node host, port, token


# ---------------------------------------------------------------- engine (server process)


@dataclass
class _Attempt:
    task_id: str
    attempt: int
    stderr_path: Path
    handle: Handle
    control: Control | None = None  # adopted attempts are signalled directly


@dataclass
class _BridgeProcess:
    proc: asyncio.subprocess.Process
    reader: asyncio.Task[None] | None = None
    fatal: str | None = None

    def healthy(self) -> bool:
        return self.proc.returncode is None and self.fatal is None


class RayEngine:
    """Engine of one pool whose tasks run on a Ray cluster (`engine = "ray"` in velda.toml).

    Pool options read: `address` (GCS address `host:port`, default `$RAY_ADDRESS` or `auto`),
    `workdir` (`shared`: the same path on every node; `upload`: ship the cwd with each
    attempt), `connect_timeout` (s, default 30), `head_timeout` (s, default 15: how
    long the head may be unreachable before running attempts are reported lost) and
    `node_timeout` (s, default 30: how long a running attempt's node may not answer before
    the attempt is reported lost). What a task asks of Ray comes from `pool.resources` of
    each launch.
    """

    name = "ray"
    places_work = True
    writes_log_index = True  # the bridge writes the chunk index with the logs
    samples_here = False  # on the nodes
    gives_terminals = True  # ray_node.py runs the attempt on a terminal of its node

    def __init__(self, pool: Pool, events: EngineEvents) -> None:
        self.events = events
        options = pool.options
        self.address = str(options.get("address") or os.environ.get("RAY_ADDRESS") or "auto")
        self.connect_timeout_s = float(str(options.get("connect_timeout", 30)))
        self.head_timeout_s = float(str(options.get("head_timeout", 15)))
        self.node_timeout_s = float(str(options.get("node_timeout", 30)))
        self._bridge: _BridgeProcess | None = None
        self._attempts: dict[str, _Attempt] = {}  # handed to the current bridge
        self._adopted: dict[str, _Attempt] = {}  # run by an earlier server's bridge
        self._watchers: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def capacity(self) -> Resources:
        return Resources()  # Ray places work itself

    async def check(self, pool: Pool) -> None:
        workdir_of(pool)
        await self._ensure_bridge()

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        return None  # the working directory is the node's business (docs/engines.md)

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        """All the starts of one scheduling pass go to the bridge in one write."""
        try:
            bridge = await self._ensure_bridge()
        except Exception as e:  # it ends these attempts, as their own failures would
            return [e for _ in launches]
        results: list[StartResult] = []
        lines = []
        for launch in launches:
            try:
                line, handle = self._start_line(launch)
            except Exception as e:  # it ends this attempt and no other
                results.append(e)
                continue
            lines.append(line)
            results.append(handle)
        await self._send_lines(bridge, lines)
        self._check_sent(bridge, launches)
        return results

    async def start(self, launch: Launch) -> Handle:
        result = (await self.start_many([launch]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _start_line(self, launch: Launch) -> tuple[bytes, Handle]:
        """The bridge's start command for the attempt, which is tracked from here on."""
        upload = workdir_of(launch.pool) == "upload"
        key = _key_of(launch)
        line = json.dumps({
            "op": "start", "key": key, "argv": launch.argv, "cwd": launch.cwd,
            "env": self._task_env(launch), "upload": upload, "options": ray_options(launch),
            "terminal": launch.terminal,
            "stdout": str(launch.stdout_path), "stderr": str(launch.stderr_path),
            "state": str(launch.attempt_dir / STATE_FILE),
        }).encode() + b"\n"
        handle: Handle = {"key": key, "address": self.address}
        self._attempts[key] = _Attempt(launch.task_id, launch.attempt, launch.stderr_path, handle)
        return line, handle

    def _check_sent(self, bridge: _BridgeProcess, launches: list[Launch]) -> None:
        """A bridge that died before the starts reached it has reported its attempts lost
        already; these ones too."""
        if self._bridge is bridge:
            return
        for launch in launches:
            attempt = self._attempts.pop(_key_of(launch), None)
            if attempt is not None:
                self._lost(attempt, "the pool's Ray driver exited")

    async def signal(self, handle: Handle, signum: int) -> None:
        await self._to_attempt(handle, {"op": "signal", "signum": signum})

    def host_of(self, handle: Handle) -> str:
        """The node's address, from the attempt's start record (ray_node.py)."""
        node_ip = handle.get("node_ip")
        if not isinstance(node_ip, str) or not node_ip:
            raise EngineError("the Ray node of this attempt is not known yet")
        return node_ip

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        await self._to_attempt(handle, {"op": "cancel", "grace_s": grace_s})

    async def terminal(self, handle: Handle, data: bytes, size: tuple[int, int] | None) -> None:
        message = {"op": "terminal", "data": base64.b64encode(data).decode(), "size": size}
        await self._to_attempt(handle, message)

    async def inventory(self, pool: Pool) -> None:
        return None

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        """The attempt's command waits in a `vrun` (on) or no longer does (off): while it
        waits, Ray may run other work on its CPUs, such as the children it waits for."""
        await self._to_attempt(handle, {"op": "lend", "on": on})

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        path = launch.attempt_dir / STATE_FILE
        state = await _settled_state(path)
        if state is None or _never_started(state):
            raise NotStartedError(task_id)
        key = f"{task_id}/{attempt}"
        tracked = _Attempt(task_id, attempt, launch.stderr_path, {"key": key,
                                                                  "address": self.address})
        self._adopted[key] = tracked
        if self._follow_state(tracked, state):
            return
        watcher = asyncio.create_task(self._watch_adopted(tracked, path, state))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def close(self) -> None:
        """Running attempts run on: the bridge finishes them and exits; the next server
        adopts them."""
        for watcher in list(self._watchers):
            watcher.cancel()
        self._attempts.clear()
        self._adopted.clear()
        bridge, self._bridge = self._bridge, None
        if bridge is None:
            return
        if bridge.reader is not None:
            bridge.reader.cancel()
        if bridge.proc.stdin is not None:
            bridge.proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bridge.proc.wait(), 2)  # at once when nothing runs

    # --- the bridge process

    async def _ensure_bridge(self) -> _BridgeProcess:
        async with self._lock:
            bridge = self._bridge
            if bridge is not None and bridge.healthy():
                return bridge  # its watchdog keeps an eye on the head
            error = await asyncio.to_thread(probe, self.address)
            if error is None and bridge is not None:
                error = bridge.fatal
            if error is not None:
                raise EngineError(f"ray cluster at {self.address} is not reachable: {error}")
            self._bridge = await self._spawn()
            return self._bridge

    async def _spawn(self) -> _BridgeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BRIDGE_CMD, self.address, str(self.head_timeout_s),
            str(self.node_timeout_s),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=bridge_env(),
            start_new_session=True,  # it outlives the server, and a Ctrl-C of the server
        )
        try:
            message = await asyncio.wait_for(_first_event(proc), self.connect_timeout_s)
        except TimeoutError:
            message = f"no answer from ray.init within {self.connect_timeout_s:g} s"
        if message is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # it may be stuck in ray.init
            await proc.wait()
            raise EngineError(f"ray cluster at {self.address} is not reachable: {message}")
        bridge = _BridgeProcess(proc)
        bridge.reader = asyncio.create_task(self._read_events(bridge))
        return bridge

    async def _send(self, bridge: _BridgeProcess, message: dict[str, Any]) -> None:
        await self._send_lines(bridge, [json.dumps(message).encode() + b"\n"])

    async def _send_lines(self, bridge: _BridgeProcess, lines: list[bytes]) -> None:
        assert bridge.proc.stdin is not None
        if not lines:
            return
        try:
            bridge.proc.stdin.write(b"".join(lines))
            await bridge.proc.stdin.drain()
        except (ConnectionError, RuntimeError) as e:
            log.warning("ray bridge is gone (%s); its attempts will be reported lost", e)

    async def _to_attempt(self, handle: Handle, message: dict[str, Any]) -> None:
        key = handle.get("key")
        if not isinstance(key, str):
            return
        adopted = self._adopted.get(key)
        if adopted is not None:
            if adopted.control is not None:
                await control_request(adopted.control, message)
            return
        bridge = self._bridge
        if key in self._attempts and bridge is not None:
            await self._send(bridge, {**message, "key": key})

    async def _read_events(self, bridge: _BridgeProcess) -> None:
        assert bridge.proc.stdout is not None
        while line := await bridge.proc.stdout.readline():
            try:
                self._on_event(bridge, json.loads(line))
            except Exception:
                log.exception("ray engine: cannot handle bridge event %r", line[:200])
        code = await bridge.proc.wait()
        self._bridge_gone(bridge, bridge.fatal or f"the pool's Ray driver exited (code {code})")

    def _on_event(self, bridge: _BridgeProcess, event: dict[str, Any]) -> None:
        kind = event["ev"]
        if kind == "fatal":
            bridge.fatal = str(event["message"])
            return
        attempt = self._attempts.get(event["key"])
        if attempt is None:
            return
        if kind == "running":
            self._running(attempt, event["node"])
        elif kind == "exited":
            del self._attempts[event["key"]]
            self.events.exited(attempt.task_id, attempt.attempt, exit_of(event["exit"]))

    def _running(self, attempt: _Attempt, node: dict[str, Any]) -> None:
        """Its command runs: the handle gains where (node), and the start is the node's,
        when the command was spawned there, not when word of it reached the server."""
        where = {k: v for k, v in node.items() if k != "at"}
        at = node.get("at")
        attempt.handle.update(where)
        self.events.running(attempt.task_id, attempt.attempt, dict(attempt.handle),
                            float(at) if isinstance(at, int | float) else None)

    def _bridge_gone(self, bridge: _BridgeProcess, message: str) -> None:
        if self._bridge is bridge:
            self._bridge = None
        log.warning("ray cluster at %s: %s", self.address, message)
        attempts, self._attempts = self._attempts, {}
        for attempt in attempts.values():
            self._lost(attempt, message)

    def _lost(self, attempt: _Attempt, message: str) -> None:
        _append(attempt.stderr_path, f"velda: ray cluster at {self.address}: {message}; "
                "this attempt was lost\n")
        self.events.exited(attempt.task_id, attempt.attempt, Exit(None, None, Reason.LOST))

    def _task_env(self, launch: Launch) -> dict[str, str]:
        env = dict(launch.env)
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the submitter's; Ray assigns the node's
        return env

    # --- attempts of an earlier server's bridge

    def _follow_state(self, tracked: _Attempt, state: dict[str, Any]) -> bool:
        """Report what ray.json says that was not reported yet; True once it has ended."""
        key = tracked.handle["key"]
        if "control" in state and tracked.control is None:
            tracked.control = (*state["control"], state["token"])
            self._running(tracked, state["node"])
        if "exit" not in state:
            return False
        del self._adopted[key]
        self.events.exited(tracked.task_id, tracked.attempt, exit_of(state["exit"]))
        return True

    async def _watch_adopted(self, tracked: _Attempt, path: Path, state: dict[str, Any]) -> None:
        bridge = state["bridge"]
        while True:
            await asyncio.sleep(ADOPT_POLL_S)
            alive = same_process(bridge["pid"], bridge["start"])
            with contextlib.suppress(ValueError):  # read after the check: a last write counts
                state = _read_state(path) or state
            if self._follow_state(tracked, state):
                return
            if not alive:
                del self._adopted[tracked.handle["key"]]
                self._lost(tracked, "the Ray driver of the previous server exited")
                return


def _key_of(launch: Launch) -> str:
    return f"{launch.task_id}/{launch.attempt}"


def workdir_of(pool: Pool) -> str:
    workdir = str(pool.options.get("workdir", "shared"))
    if workdir not in _WORKDIRS:
        raise EngineError(f"pool {pool.name}: workdir must be 'shared' or 'upload', not "
                          f"{workdir!r}")
    return workdir


def ray_options(launch: Launch) -> dict[str, Any]:
    """What one attempt asks of Ray: the pool's resources, per task. No name of its own: a
    name per task would make each submit set its options again (a third of its cost)."""
    need = launch.pool.resources
    options: dict[str, Any] = {"num_cpus": need.cpus, "num_gpus": need.gpus}
    if need.memory_mb:
        options["memory"] = need.memory_mb * 1024 * 1024
    if need.custom:
        options["resources"] = dict(need.custom)
    return options


def exit_of(status: dict[str, Any]) -> Exit:
    """An attempt's exit as its bridge reported it (or kept it in ray.json): its status and,
    where its command ran, its CPU totals."""
    reason = status.get("reason")
    cpu = status.get("cpu")
    totals = ((float(cpu[0]), float(cpu[1])) if isinstance(cpu, list) and len(cpu) == 2
              and all(isinstance(v, int | float) for v in cpu) else None)
    return Exit(status.get("code"), status.get("signal"), Reason(reason) if reason else None,
                cpu=totals)


def gcs_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) of a `host:port` address; None for `auto`."""
    if address == "auto":
        return None
    if address.startswith("ray://"):
        raise EngineError(f"ray cluster at {address}: Ray Client addresses are not supported; "
                          "run the velda server on a Ray node and give the GCS address "
                          "host:port")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise EngineError(f"ray cluster address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def probe(address: str) -> str | None:
    """Why the head at address cannot be reached (None: it accepts connections)."""
    host_port = gcs_host_port(address)
    if host_port is None:
        return None
    try:
        socket.create_connection(host_port, timeout=_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return (e.strerror or str(e) or type(e).__name__).lower()
    return None


def bridge_env() -> dict[str, str]:
    env = dict(os.environ)
    # Without this, Ray swaps 127.0.0.1 for the machine's routable address and ray.init to a
    # loopback cluster can hang forever.
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


async def _first_event(proc: asyncio.subprocess.Process) -> str | None:
    """None once the bridge is connected, else why it is not."""
    assert proc.stdout is not None
    line = await proc.stdout.readline()
    if not line:
        return f"the Ray driver exited (code {await proc.wait()}) before connecting"
    event = json.loads(line)
    return None if event["ev"] == "ready" else str(event.get("message"))


def _read_state(path: Path) -> dict[str, Any] | None:
    """ray.json (None while there is none). The bridge writes it over in place, and a read
    may catch it halfway: that is not JSON (the state only grows), so read again."""
    for _ in range(_STATE_READS):
        try:
            state: dict[str, Any] = json.loads(path.read_bytes())
            return state
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.001)
    raise ValueError(f"{path} is not JSON")


async def _settled_state(path: Path) -> dict[str, Any] | None:
    """ray.json once the attempt is running or ended, or its bridge is gone. A bridge whose
    server went away cancels what Ray had not started; that takes a moment."""
    state = _read_state(path)
    for _ in range(20):
        if state is None or "control" in state or "exit" in state:
            return state
        if not same_process(state["bridge"]["pid"], state["bridge"]["start"]):
            return _read_state(path)
        await asyncio.sleep(ADOPT_POLL_S)
        state = _read_state(path)
    return state


def _never_started(state: dict[str, Any]) -> bool:
    if "exit" in state:
        return bool(state["exit"].get("unstarted"))
    bridge = state["bridge"]
    return "control" not in state and not same_process(bridge["pid"], bridge["start"])


def _append(path: Path, text: str) -> None:
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)


async def control_request(control: Control, message: dict[str, Any]) -> bool:
    """Send one request to an attempt's control port; True once the node has acted."""
    host, port, token = control
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(host, port)
            with contextlib.closing(writer):
                writer.write(json.dumps({**message, "token": token}).encode() + b"\n")
                await writer.drain()
                return await reader.readline() == b"ok\n"
    except (OSError, TimeoutError):
        return False
