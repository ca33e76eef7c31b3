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
from urllib.parse import quote, urlencode, urlsplit

from velda import wire
from velda.paths import server_file, token_file, velda_home

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
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
        env_url = url or os.environ.get("VELDA_SERVER")
        self.url = env_url or self._local_url(start)
        self.token = token or os.environ.get("VELDA_TOKEN") or self._local_token()
        parts = urlsplit(self.url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80

    # --- finding or starting the local server

    def _local_url(self, start: bool) -> str:
        url = read_server_url(self.home)
        if url and _healthy(url):
            return url
        if not start:
            raise VeldaError(f"no velda server is running for {self.home}")
        return start_server(self.home)

    def _local_token(self) -> str:
        try:
            return token_file(self.home).read_text().strip()
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
        except OSError as e:
            raise VeldaError(f"cannot reach the velda server at {self.url}: {e}") from e

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
        if ref.isdigit():
            return self.call("GET", f"/api/v1/tasks/{ref}")
        return self.call("GET", "/api/v1/resolve?" + urlencode({"ref": ref}))

    def list_tasks(self, **query: Any) -> dict[str, Any]:
        params = [(k, v) for k, vs in query.items() for v in _as_list(vs) if v is not None]
        return self.call("GET", "/api/v1/tasks?" + urlencode(params))

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/tasks/{quote(task_id)}/cancel", {})

    def retry(self, task_id: str) -> dict[str, Any]:
        return self.call("POST", f"/api/v1/tasks/{quote(task_id)}/retry", {})

    def signal(self, task_id: str, signum: int) -> None:
        self.request("POST", f"/api/v1/tasks/{quote(task_id)}/signal", {"signal": signum})

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.call("GET", "/api/v1/pools")["pools"]
        return pools

    def server(self) -> dict[str, Any]:
        return self.call("GET", "/api/v1/server")

    def logs(self, task_id: str, stream: str, attempt: int | None = None) -> bytes:
        query = urlencode({"stream": stream, **({"attempt": attempt} if attempt else {})})
        response = self._send("GET", f"/api/v1/tasks/{quote(task_id)}/logs?{query}")
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
        query = {"follow": "1" if follow else "0", **({"attempt": attempt} if attempt else {})}
        response = self._send(
            "GET", f"/api/v1/tasks/{quote(task_id)}/output?{urlencode(query)}", timeout=None
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


def read_server_url(home: Path) -> str | None:
    try:
        return json.loads(server_file(home).read_text()).get("url")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def read_server_pid(home: Path) -> int | None:
    try:
        return json.loads(server_file(home).read_text()).get("pid")  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _healthy(url: str) -> bool:
    parts = urlsplit(url)
    try:
        response = wire.request(parts.hostname or "127.0.0.1", parts.port or 80, "GET",
                                "/healthz", {}, None, 2.0)
    except OSError:
        return False
    response.close()
    return response.status == 200


def start_server(home: Path, extra_args: list[str] | None = None) -> str:
    """Start a server for `home` in the background and wait until it answers."""
    import subprocess  # only here: it is not cheap to import, and most calls need no start

    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "velda.server", "--home", str(home), *(extra_args or [])],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        url = read_server_url(home)
        if url and _healthy(url):
            return url
        if proc.poll() is not None and proc.returncode != 0:
            url = read_server_url(home)  # another process may have won the race
            if url and _healthy(url):
                return url
            raise VeldaError(f"the velda server did not start; see {home / 'server.log'}")
        time.sleep(0.05)
    raise VeldaError(f"the velda server did not answer in time; see {home / 'server.log'}")
