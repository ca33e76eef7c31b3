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

from velda import wire
from velda.paths import server_file, token_file, velda_home

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

START_TIMEOUT_S = 30.0


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
    def __init__(self, url: str | None = None, token: str | None = None, start: bool = True):
        self.home = velda_home()
        given = url or os.environ.get("VELDA_SERVER")
        self._may_start = start and not given
        self.url = given or self._local_url(start)
        self.token = token or os.environ.get("VELDA_TOKEN") or self._local_token()
        self._host, self._port = split_url(self.url)

    # --- finding or starting the local server

    def _local_url(self, start: bool) -> str:
        """The URL in server.json while its process lives (a signal 0, no round trip);
        else a newly started server's."""
        info = read_server_info(self.home)
        if info and _alive(info.get("pid")):
            return str(info["url"])
        if not start:
            raise VeldaError(f"no velda server is running for {self.home}")
        return start_server(self.home)

    def _restart(self) -> None:
        self.url = start_server(self.home)
        self._host, self._port = split_url(self.url)

    def _local_token(self) -> str:
        try:
            with open(token_file(self.home)) as f:
                return f.read().strip()
        except OSError:
            raise VeldaError(
                f"no token: set VELDA_TOKEN or run on the server's machine ({self.home})"
            ) from None

    # --- HTTP

    def request(self, method: str, path: str, body: Any = None) -> Any:
        response = self._send(method, path, body)
        try:
            data = response.read()
        finally:
            response.close()
        return self._decode(response.status, data)

    def _send(
        self, method: str, path: str, body: Any = None, timeout: float | None = 60
    ) -> wire.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            return wire.request(self._host, self._port, method, path, headers, payload, timeout)
        except ConnectionRefusedError:
            if not self._may_start:
                raise VeldaError(f"cannot reach the velda server at {self.url}") from None
        except OSError as e:
            raise VeldaError(f"cannot reach the velda server at {self.url}: {e}") from e
        self._restart()  # the local server is gone (killed, say): start a new one, once
        self._may_start = False
        return self._send(method, path, body, timeout)

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """A call whose answer is a JSON object."""
        value = self.request(method, path, body)
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
        return self.call("POST", "/api/v1/tasks", request)

    def get(self, ref: str) -> dict[str, Any]:
        from urllib.parse import urlencode

        if ref.isdigit():
            return self.call("GET", f"/api/v1/tasks/{ref}")
        return self.call("GET", "/api/v1/resolve?" + urlencode({"ref": ref}))

    def list_tasks(self, **query: Any) -> dict[str, Any]:
        from urllib.parse import urlencode

        params = [(k, v) for k, vs in query.items() for v in _as_list(vs) if v is not None]
        return self.call("GET", "/api/v1/tasks?" + urlencode(params))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/tasks/{_id(task_id)}/cancel", {})

    def retry(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/tasks/{_id(task_id)}/retry", {})

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
        response = self._send("GET", f"/api/v1/tasks/{_id(task_id)}/logs?{query}")
        try:
            data = response.read()
        finally:
            response.close()
        if response.status >= 400:
            self._decode(response.status, data)
        return data

    def output(
        self, task_id: str, follow: bool = True, attempt: int | None = None
    ) -> Iterator[tuple[str, Any]]:
        """('stdout', bytes), ('stderr', bytes) and ('task', dict) as they happen."""
        from urllib.parse import urlencode

        query = {"follow": "1" if follow else "0", **({"attempt": attempt} if attempt else {})}
        response = self._send(
            "GET", f"/api/v1/tasks/{_id(task_id)}/output?{urlencode(query)}", timeout=None
        )
        try:
            if response.status >= 400:
                self._decode(response.status, response.read())
            yield from _frames(response)
        finally:
            response.close()

    def web_url(self, task_id: str | None = None) -> str:
        return f"{self.url}/tasks/{task_id}" if task_id else f"{self.url}/"


_KINDS = {"o": "stdout", "e": "stderr", "s": "task"}


def _frames(response: wire.Response) -> Iterator[tuple[str, Any]]:
    while True:
        header = response.readline()
        if not header:
            return
        kind, _, size = header.decode().strip().partition(" ")
        data = response.read(int(size)) if size else b""
        if kind == "s":
            yield "task", json.loads(data)
        else:
            yield _KINDS[kind], data


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _id(task_id: str) -> str:
    if not task_id.isdigit():
        raise VeldaError(f"{task_id!r} is not a task ID", 400)
    return task_id


def split_url(url: str) -> tuple[str, int]:
    """('host', port) of http://host:port[/...], without urllib's import cost."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":") if not rest.endswith("]") else (rest, "", "")
    if not host or not port.isdigit():
        host, port = rest, "80"
    return host.strip("[]") or "127.0.0.1", int(port)


def read_server_info(home: str) -> dict[str, Any] | None:
    """What the running server wrote in server.json: url and pid."""
    try:
        with open(server_file(home)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "url" in info else None


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def healthy(url: str) -> bool:
    host, port = split_url(url)
    try:
        response = wire.request(host, port, "GET", "/healthz", {}, None, 2.0)
    except OSError:
        return False
    response.close()
    return response.status == 200


def start_server(home: str, extra_args: list[str] | None = None) -> str:
    """Start a server for `home` in the background and wait until it answers."""
    import subprocess  # only here: it is not cheap to import, and most calls need no start

    os.makedirs(home, mode=0o700, exist_ok=True)
    log_path = os.path.join(home, "server.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "velda.server", "--home", home, *(extra_args or [])],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        url = _answering_url(home)
        if url:
            return url
        if proc.poll() is not None and proc.returncode != 0:
            url = _answering_url(home)  # another process may have won the race to start
            if url:
                return url
            raise VeldaError(f"the velda server did not start; see {log_path}")
        time.sleep(0.05)
    raise VeldaError(f"the velda server did not answer in time; see {log_path}")


def _answering_url(home: str) -> str | None:
    info = read_server_info(home)
    url = str(info["url"]) if info else None
    return url if url and healthy(url) else None
