"""Request shapes shared by the client and the server, and the one-line errors for bad input.

Imports nothing of either side, so the CLI can use it without paying for the server.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

TYPE_CHECKING = False  # typing is not imported at run time: the CLI imports this module
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _T = TypeVar("_T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_NAME = 200
MAX_SHARDS = 10_000
MAX_BATCH = 10_000  # tasks in one POST /api/v1/tasks:batch
MAX_TIMEOUT_S = 30 * 86400
MAX_ID = 2**63 - 1  # SQLite's INTEGER: IDs, offsets and tokens fit in 63 bits


class BadRequest(ValueError):
    """Bad input. `field` names the request field at fault."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


def in_item(index: int | None, step: Callable[..., _T], *args: Any) -> _T:
    """`step(*args)` for the index-th of several requests sent together: its BadRequest
    says which one (`tasks[3]: pool: ...`, field `tasks[3].pool`). No index: a request on
    its own, whose errors stay as they are."""
    try:
        return step(*args)
    except BadRequest as e:
        if index is None:
            raise
        field = f"tasks[{index}]" + (f".{e.field}" if e.field else "")
        raise BadRequest(f"tasks[{index}]: {e}", field, e.status) from e


def parse_duration(value: object, field: str = "timeout") -> float | None:
    """'90s', '30m', '2h', '1.5h' or a number of seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _seconds(value, 1)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = _seconds(m.group(1), _UNITS[m.group(2)])
    else:
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise BadRequest(f"{field}: {shown!r} is not a duration like 90s, 30m or 2h", field)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise BadRequest(f"{field}: must be more than 0 and at most 30 days", field)
    return seconds


def _seconds(number: object, unit: float) -> float:
    """A finite number of seconds, or NaN (refused by the caller) when it overflows."""
    try:
        seconds = float(number) * unit  # type: ignore[arg-type]
    except (OverflowError, ValueError):
        return math.nan
    return seconds if math.isfinite(seconds) else math.nan


def check_text(value: str, field: str, nul: bool = False) -> str:
    """Text the store and the OS can take: valid UTF-8 (no lone surrogates), and no NUL
    where it ends up in argv, the environment or a path."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: not valid UTF-8 (a lone surrogate)", field) from None
    if not nul and "\0" in value:
        raise BadRequest(f"{field}: must not contain NUL characters", field)
    return value


def check_id(value: int, field: str) -> int:
    if not 0 <= value <= MAX_ID:
        raise BadRequest(f"{field}: must be from 0 to {MAX_ID}", field)
    return value


def parse_int(text: str | None, field: str, low: int = 0, high: int = MAX_ID) -> int | None:
    """A query or path integer: ASCII digits only (int() also takes '٣'), within bounds."""
    if text is None or text == "":
        return None
    digits = text[1:] if text[:1] == "-" else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 19:
        raise BadRequest(f"{field}: {text[:40]!r} is not an integer from {low} to {high}", field)
    value = int(text)
    if not low <= value <= high:
        raise BadRequest(f"{field}: must be from {low} to {high}", field)
    return value


def env_key(key: str) -> str:
    """A name the OS takes as an environment variable: not empty, no '=', no NUL."""
    if not key or "=" in key or "\0" in key:
        raise BadRequest(f"env: {key!r} is not a valid variable name", "env")
    return check_text(key, "env")


def check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isprintable():
        raise BadRequest("name: must be 1-200 printable characters", "name")
    return check_text(name, "name")


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise BadRequest(f"label: {text[:80]!r} is not KEY=VALUE", "labels")
    return check_text(key, "labels"), check_text(value, "labels")


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
    terminal: tuple[int, int] | None = None  # {"rows": R, "cols": C}: run under a terminal

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
            terminal=parse_terminal(body.get("terminal")),
        )
        req.check()
        return req

    def check(self) -> None:
        if not self.command and self.total_shards is None:
            raise BadRequest("command: give a command to run", "command")
        if self.gang and self.total_shards is None:
            raise BadRequest("gang: only with total_shards (-N)", "gang")
        if self.terminal and self.total_shards is not None:
            raise BadRequest("terminal: a terminal is for one task, not for -N shards",
                             "terminal")
        if not self.cwd.startswith("/"):
            raise BadRequest(f"cwd: {self.cwd!r} is not an absolute path", "cwd")


MAX_TERMINAL_SIDE = 10_000


def parse_terminal(value: object, name: str = "terminal") -> tuple[int, int] | None:
    """A terminal's size, {"rows": R, "cols": C} in JSON, as (rows, cols); None for none."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"rows", "cols"}:
        raise BadRequest(f'{name}: must be {{"rows": R, "cols": C}} or null', name)
    return (_int(value["rows"], f"{name}.rows", 1, MAX_TERMINAL_SIDE),
            _int(value["cols"], f"{name}.cols", 1, MAX_TERMINAL_SIDE))


def _str_list(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{name}: must be a list of strings", name)
    if not _all_text(value):
        for v in value:
            check_text(v, name)
    return list(value)


def _str_dict(value: object, name: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{name}: must be an object of strings", name)
    if all(k and "=" not in k for k in value) and _all_text([*value, *value.values()]):
        return dict(value)  # what a submit's whole environment usually is: checked at once
    for k, v in value.items():
        if name == "env":
            env_key(k)
        elif not k or "=" in k:
            raise BadRequest(f"{name}: {k!r} is not a valid key", name)
        check_text(k, name)
        check_text(v, name)
    return dict(value)


def _all_text(strings: list[str]) -> bool:
    """Whether every string passes check_text, checked in one go (a miss is then looked for
    string by string, to name it)."""
    joined = "".join(strings)
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in joined


def _opt_str(value: object, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{name}: must be a string", name)
    return None if value is None else check_text(value, name)


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
