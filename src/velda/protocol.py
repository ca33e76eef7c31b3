"""Request shapes shared by the client and the server, and the one-line errors for bad input.

Imports nothing of either side, so the CLI can use it without paying for the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_NAME = 200
MAX_SHARDS = 100_000


class BadRequest(ValueError):
    """Bad input. `field` names the request field at fault."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def parse_duration(value: object, field: str = "timeout") -> float | None:
    """'90s', '30m', '2h', '1.5h' or a number of seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise BadRequest(f"{field}: {value!r} is not a duration like 90s, 30m or 2h", field)
    if seconds <= 0:
        raise BadRequest(f"{field}: must be more than 0", field)
    return seconds


def check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise BadRequest("name: must be 1-200 printable characters", "name")
    return name


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise BadRequest(f"label: {text!r} is not KEY=VALUE", "labels")
    return key, value


@dataclass
class SubmitRequest:
    command: list[str]
    pool: str | None = None
    name: str | None = None
    after_success: list[str] = field(default_factory=list)
    after_fail: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    priority: int = 0
    total_shards: int | None = None
    gang: bool = False
    retries: int = 0
    timeout_s: float | None = None
    blocking: bool = False

    @classmethod
    def from_json(cls, body: object) -> SubmitRequest:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        known = set(cls.__dataclass_fields__) | {"timeout"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise BadRequest(f"{unknown[0]}: unknown field", unknown[0])
        req = cls(
            command=_str_list(body.get("command", []), "command"),
            pool=_opt_str(body.get("pool"), "pool"),
            name=check_name(body.get("name")),
            after_success=_str_list(body.get("after_success", []), "after_success"),
            after_fail=_str_list(body.get("after_fail", []), "after_fail"),
            after=_str_list(body.get("after", []), "after"),
            labels=_str_dict(body.get("labels", {}), "labels"),
            env=_str_dict(body.get("env", {}), "env"),
            cwd=_opt_str(body.get("cwd"), "cwd") or "/",
            priority=_int(body.get("priority", 0), "priority", -(10**9), 10**9),
            total_shards=_opt_int(body.get("total_shards"), "total_shards", 1, MAX_SHARDS),
            gang=_bool(body.get("gang", False), "gang"),
            retries=_int(body.get("retries", 0), "retries", 0, 1000),
            timeout_s=parse_duration(body.get("timeout", body.get("timeout_s"))),
            blocking=_bool(body.get("blocking", False), "blocking"),
        )
        req.check()
        return req

    def check(self) -> None:
        if not self.command and self.total_shards is None:
            raise BadRequest("command: give a command to run", "command")
        if self.gang and self.total_shards is None:
            raise BadRequest("gang: only with total_shards (-N)", "gang")
        if not self.cwd.startswith("/"):
            raise BadRequest(f"cwd: {self.cwd!r} is not an absolute path", "cwd")


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name}: must be a list of strings", name)
    if any("\0" in v for v in value):
        raise BadRequest(f"{name}: must not contain NUL characters", name)
    return list(value)


def _str_dict(value: object, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name}: must be an object of strings", name)
    if any("\0" in k or "\0" in v or "=" in k for k, v in value.items()):
        raise BadRequest(f"{name}: keys and values must not contain NUL or '=' in keys", name)
    return dict(value)


def _opt_str(value: object, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string", name)
    return value


def _int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name}: must be an integer from {low} to {high}", name)
    return value


def _opt_int(value: object, name: str, low: int, high: int) -> int | None:
    return None if value is None else _int(value, name, low, high)


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name}: must be true or false", name)
    return value
