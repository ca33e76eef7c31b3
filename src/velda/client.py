"""A thin client of the HTTP API, used by the CLI and importable as `velda.Client`.

Only the standard library's light modules: every `vbatch` pays for what this imports. Finding
the server: `VELDA_SERVER` and `VELDA_TOKEN` when set (inside a task, or for a team server),
else the local server of `VELDA_HOME`, which is started in the background when none answers.
"""

from __future__ import annotations

import json
import os
import sys
import time

from velda import server_address, wire
from velda.paths import token_file, velda_home
from velda.server_address import alive, read_token, running_url, split_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

START_TIMEOUT_S = 30.0
RETRY_S = 120.0  # how long a call keeps trying to reach the server (VELDA_RETRY_S)
_RETRY_STATUSES = (502, 503)  # a proxy in front of a server that is down, or one starting


class VeldaError(Exception):
    """Anything that went wrong talking to the server. `status` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field

    @property
    def is_usage(self) -> bool:
        return self.status is not None and 400 <= self.status < 500 and self.status != 401


class Client:
    def __init__(
        self, url: str | None = None, token: str | None = None, start: bool = True,
        quiet: bool = False,
    ):
        self.home = velda_home()
        self.quiet = quiet
        self.retry_s = retry_seconds()
        self._warned = False
        given = url or os.environ.get("VELDA_SERVER")
        # A server on this machine may move (server.json says where) and be started again:
        # a task on the server's machine has a loopback VELDA_SERVER and the home's token.
        # An explicit `url` (the Python API) never starts one.
        self._local = not given or _loopback(given)
        self._may_start = start and (
            not given or (not url and self._local and os.path.exists(token_file(self.home))))
        self.url = given or self._local_url(start)
        self.token = token or os.environ.get("VELDA_TOKEN") or self._local_token()
        self._host, self._port = split_url(self.url)
        self._link = wire.Link()  # whole-answer calls keep their connection for the next
        self._here = True  # output is read from the log files while that works (_logs_here)

    # --- finding or starting the local server

    def _local_url(self, start: bool) -> str:
        """The URL in server.json while its process lives (a signal 0, no round trip);
        else a newly started server's."""
        url = running_url(self.home, json.loads)
        if url:
            return url
        if not start:
            raise VeldaError(f"no velda server is running for {self.home}")
        return self._start_server()

    def _start_server(self) -> str:
        """Start the local server, one client at a time; the others then find it running."""
        import fcntl  # only here: most commands never start a server

        os.makedirs(self.home, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.home, "start.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # a slow start (a busy machine, a large store to recover) is waited for as long
            # as an unreachable server would be
            timeout = max(START_TIMEOUT_S, self.retry_s)
            return _answering_url(self.home) or start_server(self.home, None, timeout)
        finally:
            os.close(fd)

    def _use(self, url: str) -> None:
        self.url = url
        self._host, self._port = split_url(url)

    def _find_again(self, retry: _Retry) -> None:
        """Between two tries: the server this home's server.json names, if it moved to
        another port; else start it, when this client may; else wait a little longer."""
        if self._moved():
            return
        info = read_server_info(self.home)
        if self._may_start and not alive(info and info.get("pid")):
            try:
                self._use(self._start_server())
                return
            except VeldaError:
                pass  # another process is starting it, or it failed: wait and try again
        retry.sleep()

    def _moved(self) -> bool:
        """Does this home's server.json name a live server at another URL (a restarted
        server that could not get its port back)? Then use that one."""
        info = read_server_info(self.home) if self._local else None
        if info and alive(info.get("pid")) and info["url"] != self.url:
            self._use(str(info["url"]))
            return True
        return False

    def _say_retrying(self) -> None:
        if not self._warned and not self.quiet and self.retry_s > 0:
            print(f"velda server unreachable, retrying for up to {self.retry_s:g} s",
                  file=sys.stderr, flush=True)
        self._warned = True

    def _local_token(self) -> str:
        token = read_token(self.home)
        if token is None:
            raise VeldaError(
                f"no token: set VELDA_TOKEN or run on the server's machine ({self.home})")
        return token

    # --- HTTP

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        status, data = self._exchange(method, path, body, headers)
        return self._decode(status, data)

    def _exchange(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        """Status and whole body; asked again while the server cannot be reached, answers
        502/503, or cuts its answer short (see docs/architecture.md on retries)."""
        retry = _Retry(self)
        sent_headers, payload = self._parts(body, headers)
        while True:
            try:
                status, data = self._link.exchange(self._host, self._port, method, path,
                                                   sent_headers, payload, 60)
            except OSError as e:
                retry.wait(e)
                continue
            if status == 401 and self._moved():
                continue  # another program took the old port: ours announced a new one
            if status not in _RETRY_STATUSES:
                return status, data
            retry.wait(OSError(f"HTTP {status}"))

    def _send(
        self, method: str, path: str, body: Any = None, timeout: float | None = 60
    ) -> wire.Response:
        """A response whose body is still to be read (a stream), retried as `_exchange`."""
        retry = _Retry(self)
        while True:
            try:
                response = self._send_once(method, path, body, None, timeout)
            except OSError as e:
                retry.wait(e)
                continue
            if response.status == 401 and self._moved():
                response.close()
                continue
            if response.status not in _RETRY_STATUSES:
                return response
            response.close()
            retry.wait(OSError(f"HTTP {response.status}"))

    def _send_once(
        self, method: str, path: str, body: Any, extra: dict[str, str] | None,
        timeout: float | None,
    ) -> wire.Response:
        headers, payload = self._parts(body, extra)
        return wire.request(self._host, self._port, method, path, headers, payload, timeout)

    def _parts(
        self, body: Any, extra: dict[str, str] | None
    ) -> tuple[dict[str, str], bytes | None]:
        """A request's headers and body."""
        headers = {"Authorization": f"Bearer {self.token}", **(extra or {})}
        if body is None:
            return headers, None
        headers["Content-Type"] = "application/json"
        return headers, json.dumps(body).encode()

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A call whose answer is a JSON object."""
        value = self.request(method, path, body, headers)
        if not isinstance(value, dict):
            raise VeldaError(f"unexpected answer from the server to {method} {path}")
        return value

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        try:
            value = json.loads(data) if data else None
        except ValueError:
            value = None
        if status >= 400:
            message = value.get("error") if isinstance(value, dict) else data[:200].decode()
            field = value.get("field") if isinstance(value, dict) else None
            raise VeldaError(message or f"HTTP {status}", status, field)
        return value

    # --- the calls

    def submit(self, **request: Any) -> dict[str, Any]:
        """A new task. The call carries a key of its own, so that asking again after a lost
        answer returns the task the first try made instead of making a second one."""
        return self.call("POST", "/api/v1/tasks", request, _new_key())

    def submit_many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Many new tasks in one request, each a dict of `submit`'s arguments, stored all or
        none and in order (a later one may name an earlier one in `after_success`); at most
        10,000 at a time. Each answer has the task's `id`, `name`, `status` and `pool`. Safe
        to repeat for the same reason as `submit`."""
        answer = self.call("POST", "/api/v1/tasks:batch", {"tasks": requests}, _new_key())
        tasks = answer.get("tasks")
        if not isinstance(tasks, list):
            raise VeldaError("unexpected answer from the server to a bulk submit")
        return tasks

    def get(self, ref: str) -> dict[str, Any]:
        from urllib.parse import urlencode

        if _is_id(ref):
            return self.call("GET", f"/api/v1/tasks/{ref}")
        return self.call("GET", "/api/v1/resolve?" + urlencode({"ref": ref}))

    def list_tasks(self, **query: Any) -> dict[str, Any]:
        from urllib.parse import urlencode

        params = [(k, v) for k, vs in query.items() for v in _as_list(vs) if v is not None]
        return self.call("GET", "/api/v1/tasks?" + urlencode(params))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/tasks/{_id(task_id)}/cancel", {})

    def retry(self, task_id: str) -> dict[str, Any]:
        """Reopen a task; safe to repeat for the same reason as `submit`."""
        return self.call("POST", f"/api/v1/tasks/{_id(task_id)}/retry", {}, _new_key())

    def signal(self, task_id: str, signum: int) -> None:
        self.request("POST", f"/api/v1/tasks/{_id(task_id)}/signal", {"signal": signum})

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.call("GET", "/api/v1/pools")["pools"]
        return pools

    def server(self) -> dict[str, Any]:
        return self.call("GET", "/api/v1/server")

    def logs(self, task_id: str, stream: str, attempt: int | None = None) -> bytes:
        from urllib.parse import urlencode

        query = urlencode({"stream": stream, **({"attempt": attempt} if attempt else {})})
        status, data = self._exchange("GET", f"/api/v1/tasks/{_id(task_id)}/logs?{query}", None,
                                      None)
        if status >= 400:
            self._decode(status, data)
        return data

    def log_chunks(
        self, task_id: str, stream: str, attempt: int | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        """One stream (stdout, stderr, or combined) as it arrives; with follow, until the
        attempt has ended and its output is drained. A stream cut (the server restarted) is
        asked again from the offset reached, for up to VELDA_RETRY_S without a byte."""
        had, heard = 0, time.monotonic()
        while True:
            try:
                for data in self._log_chunks_from(task_id, stream, attempt, follow, had):
                    had, heard = had + len(data), time.monotonic()
                    yield data
                return
            except OSError as e:
                if time.monotonic() - heard > self.retry_s:
                    raise VeldaError(f"lost the connection to the server: {e}") from e
                time.sleep(0.1)

    def _log_chunks_from(
        self, task_id: str, stream: str, attempt: int | None, follow: bool, offset: int
    ) -> Iterator[bytes]:
        from urllib.parse import urlencode

        query = {"stream": stream, "follow": "1" if follow else "0", "offset": offset,
                 **({"attempt": attempt} if attempt else {})}
        response = self._send(
            "GET", f"/api/v1/tasks/{_id(task_id)}/logs?{urlencode(query)}", timeout=None
        )
        try:
            if response.status >= 400:
                self._decode(response.status, response.read())
            while data := response.read_some():
                yield data
        finally:
            response.close()

    def output(
        self, task_id: str, follow: bool = True, attempt: int | None = None,
        resume: tuple[int, int, int] | None = None,
    ) -> Iterator[tuple[str, Any]]:
        """('stdout', bytes), ('stderr', bytes) and ('task', dict) as they happen. With
        `resume` (attempt, stdout bytes, stderr bytes already had) the stream starts there and
        also yields ('attempt', n) when it moves to attempt n and ('end', b"") at its end."""
        from urllib.parse import urlencode

        query: dict[str, Any] = {"follow": "1" if follow else "0",
                                 **({"attempt": attempt} if attempt else {})}
        if resume:
            query.update(from_attempt=resume[0], stdout_offset=resume[1],
                         stderr_offset=resume[2])
        if self._logs_here():
            query["here"] = "1"
        response = self._send(
            "GET", f"/api/v1/tasks/{_id(task_id)}/output?{urlencode(query)}", timeout=None
        )
        try:
            if response.status >= 400:
                self._decode(response.status, response.read())
            yield from _frames(response, self._read_here)
        finally:
            response.close()

    def _logs_here(self) -> bool:
        """May this client read a task's output from the log files (`/output?here=1`)? Only
        those of its own home's server, which are its user's files, and only until such a
        read fails (a stream that broke on it is resumed with the bytes sent instead)."""
        if not self._local or not self._here:
            return False
        info = read_server_info(self.home)
        return info is not None and info["url"] == self.url

    def _read_here(self, where: bytes) -> Iterator[bytes]:
        try:
            yield from _read_log(where)
        except OSError:
            self._here = False
            raise

    def events(self, task_id: str, subtree: bool = False) -> Iterator[dict[str, Any]]:
        """The task (with `subtree`, also its subtree's counts) at every change, until it is
        final or the stream breaks."""
        query = "?subtree=1" if subtree else ""
        response = self._send("GET", f"/api/v1/tasks/{_id(task_id)}/events{query}", timeout=None)
        try:
            if response.status >= 400:
                self._decode(response.status, response.read())
            while line := response.readline():
                if line.startswith(b"data: "):
                    yield json.loads(line[6:])
        finally:
            response.close()

    def web_url(self, task_id: str | None = None) -> str:
        return f"{self.url}/tasks/{task_id}" if task_id else f"{self.url}/"


_KINDS = {"o": "stdout", "e": "stderr", "s": "task", "z": "end"}


def _frames(
    response: wire.Response, read_here: Callable[[bytes], Iterator[bytes]]
) -> Iterator[tuple[str, Any]]:
    while True:
        header = response.readline()
        if not header:
            return
        kind, _, size = header.decode().strip().partition(" ")
        data = response.read(int(size)) if size else b""
        if len(data) < int(size or 0) or not header.endswith(b"\n"):
            raise OSError("the server closed the connection in the middle of a frame")
        if kind == "s":
            yield "task", json.loads(data)
        elif kind == "a":
            yield "attempt", int(data)
        elif kind in _HERE:
            for piece in read_here(data):
                yield _HERE[kind], piece
        else:
            yield _KINDS[kind], data


_HERE = {"O": "stdout", "E": "stderr"}  # frames that say where the bytes are (`here`)
_HERE_PIECE = 1 << 20


def _read_log(where: bytes) -> Iterator[bytes]:
    """The bytes an `O` or `E` frame names (`OFFSET LENGTH PATH`), a piece at a time."""
    offset_text, length_text, path = where.split(b" ", 2)
    offset, left = int(offset_text), int(length_text)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while left:
            data = os.pread(fd, min(left, _HERE_PIECE), offset)
            if not data:
                raise OSError(f"{os.fsdecode(path)} is shorter than the server said")
            offset, left = offset + len(data), left - len(data)
            yield data
    finally:
        os.close(fd)


class _Retry:
    """One call's tries: the first failure starts the clock (VELDA_RETRY_S); between tries
    the client looks for the server again (it may have moved, or be startable); when the
    time is up, the last problem is the error."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.deadline: float | None = None
        self.pause = 0.05

    def wait(self, problem: OSError) -> None:
        client, now = self.client, time.monotonic()
        if self.deadline is None:
            self.deadline = now + client.retry_s
        elif now >= self.deadline:
            detail = "" if isinstance(problem, ConnectionRefusedError) else f": {problem}"
            raise VeldaError(f"cannot reach the velda server at {client.url}{detail}")
        client._find_again(self)

    def sleep(self) -> None:
        """Wait before the next try; the first wait says so (a server found or started again
        at once is not worth a line)."""
        assert self.deadline is not None
        self.client._say_retrying()
        time.sleep(max(0.0, min(self.pause, self.deadline - time.monotonic())))
        self.pause = min(self.pause * 2, 2.0)


def retry_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get("VELDA_RETRY_S", RETRY_S)))
    except ValueError:
        return RETRY_S


def _new_key() -> dict[str, str]:
    """A fresh idempotency key: one per logical call, the same on each of its tries."""
    return {"Idempotency-Key": os.urandom(16).hex()}


def _loopback(url: str) -> bool:
    host = split_url(url)[0]
    return host.startswith("127.") or host in ("localhost", "::1")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _is_id(ref: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which no URL path may carry."""
    return ref.isascii() and ref.isdigit()


def _id(task_id: str) -> str:
    if not _is_id(task_id):
        raise VeldaError(f"{task_id!r} is not a task ID", 400)
    return task_id


def read_server_info(home: str) -> dict[str, Any] | None:
    """What the running server wrote in server.json: url and pid."""
    return server_address.read_server_info(home, json.loads)


def healthy(url: str) -> bool:
    host, port = split_url(url)
    try:
        response = wire.request(host, port, "GET", "/healthz", {}, None, 2.0)
    except OSError:
        return False
    response.close()
    return response.status == 200


def start_server(
    home: str, extra_args: list[str] | None = None, timeout: float = START_TIMEOUT_S
) -> str:
    """Start a server for `home` in the background and wait until it answers."""
    import subprocess  # only here: it is not cheap to import, and most calls need no start

    os.makedirs(home, mode=0o700, exist_ok=True)
    log_path = os.path.join(home, "server.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # private
    with open(log_fd, "ab") as log:
        # the server under its reaper, which keeps the exit status of the tasks it starts
        # should it die (engines/reaper.py)
        proc = subprocess.Popen(
            [sys.executable, "-m", "velda.engines.reaper", os.path.join(home, "server.lock"),
             sys.executable, "-m", "velda.server", "--home", home, *(extra_args or [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env=_server_env(),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = _answering_url(home)
        if url:
            return url
        # a server that lost the race to start exits; the winner may still be recovering
        if proc.poll() is not None and proc.returncode != 0 and not server_lock_held(home):
            url = _answering_url(home)
            if url:
                return url
            raise VeldaError(f"the velda server did not start; see {log_path}")
        time.sleep(0.05)
    raise VeldaError(f"the velda server did not answer in time; see {log_path}")


def _server_env() -> dict[str, str]:
    """This environment less what a task's environment adds: a server started again from
    inside a task must not take the task's identity, token or GPU mask for its own."""
    env = dict(os.environ)
    if "VELDA_TASK_ID" in env:
        for name in ("VELDA_SERVER", "VELDA_TOKEN", "VELDA_TASK_ID", "VELDA_TASK_NAME",
                     "VELDA_POOL", "VELDA_ATTEMPT", "VELDA_SHARD_ID", "VELDA_TOTAL_SHARDS",
                     "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
            env.pop(name, None)
    return env


def server_lock_held(home: str) -> bool:
    """Does a server of `home` live (it holds the home's lock while it runs, busy or not)?"""
    import fcntl

    try:
        fd = os.open(os.path.join(home, "server.lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _answering_url(home: str) -> str | None:
    """The URL of the home's server if it runs and answers. A dead server's URL may answer
    too: another program may have taken its port."""
    info = read_server_info(home)
    url = str(info["url"]) if info and alive(info.get("pid")) else None
    return url if url and healthy(url) else None
