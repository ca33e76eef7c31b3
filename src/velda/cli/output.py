"""Rendering tasks and pools: table, wide, json, yaml, or a list of fields (SPEC §3.2)."""

from __future__ import annotations

import json
from datetime import datetime

from velda.client import VeldaError

TYPE_CHECKING = False  # typing is not imported at run time: it slows every command
if TYPE_CHECKING:
    from typing import Any

TABLE = ["id", "name", "status", "pool", "children", "created", "duration"]
WIDE = TABLE + ["cpu", "memory", "attempt", "exit_code", "reason", "parent_id", "labels",
                "command"]
FORMATS = ("table", "wide", "json", "yaml")
# The fields of a task's JSON (SPEC §3.2) and the ones computed from them, for -o a,b,c
TASK_FIELDS = (
    "id", "name", "status", "pool", "command", "cwd", "parent_id", "labels", "priority",
    "attempt", "retries", "timeout_s", "exit_code", "signal", "reason", "reason_detail",
    "created_at", "started_at", "finished_at", "resolved_at", "depends_on", "children",
    "shard_id", "total_shards", "gang", "waiting_for", "usage", "created", "duration", "cpu",
    "memory",
)


class UnknownField(VeldaError):
    """-o names a field that does not exist: a usage error (exit 2), like a 4xx."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 400, "output")
# what a cell counts, where the name alone does not say: a parent's direct children
HEADERS = {"children": "CHILDREN(OK/FAILED/ALL)"}


def render(
    data: Any, fmt: str, columns: list[str], header: bool = True,
    fields: tuple[str, ...] = TASK_FIELDS,
) -> str:
    """`data` is one row (dict) or a list of rows. json/yaml print it as it is. `fields`: what
    `fmt` may name besides `columns` and the rows' own keys."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        return to_yaml(data).rstrip("\n")
    rows = data if isinstance(data, list) else [data]
    if fmt == "wide":
        columns = WIDE
    elif fmt != "table":
        known = [*columns, *fields, *(k for row in rows for k in row)]
        columns = [c.strip() for c in fmt.split(",") if c.strip()]
        _check_fields(columns, dict.fromkeys(known))
    return table(rows, columns, header)


def _check_fields(columns: list[str], known: dict[str, None]) -> None:
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise UnknownField(
            f"-o: no field '{unknown[0]}'; use table, wide, json, yaml, or fields from: "
            + ",".join(known)
        )


def table(rows: list[dict[str, Any]], columns: list[str], header: bool = True) -> str:
    cells = [[cell(row, c) for c in columns] for row in rows]
    if header:
        cells.insert(0, [HEADERS.get(c, c.upper()) for c in columns])
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def cell(row: dict[str, Any], column: str) -> str:
    if column == "children":
        c = row.get("children") or {}
        if not c.get("total"):
            return "-"
        return f"{c['succeeded']}/{c['failed']}/{c['total']}"
    if column == "created":
        return short_time(row.get("created_at"))
    if column == "duration":
        return duration(row.get("started_at"), row.get("resolved_at") or row.get("finished_at"))
    if column in ("cpu", "memory") and "usage" in row:
        from velda.cli.usage import cpu_cell, memory_cell

        return (cpu_cell if column == "cpu" else memory_cell)(row["usage"])
    value = row.get(column)
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def short_time(ts: str | None) -> str:
    if not ts:
        return "-"
    return _parse(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(start: str | None, end: str | None) -> str:
    if not start:
        return "-"
    from datetime import UTC

    stop = _parse(end) if end else datetime.now(UTC)
    seconds = max(0.0, (stop - _parse(start)).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def to_yaml(value: Any, indent: int = 0) -> str:
    """YAML for JSON-shaped data, without a YAML library on the CLI's import path."""
    pad = "  " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        out = []
        for k, v in value.items():
            key = _scalar(str(k))
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{key}:\n{to_yaml(v, indent + 1)}")
            else:
                out.append(f"{pad}{key}: {_inline(v)}\n")
        return "".join(out)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        out = []
        for item in value:
            if isinstance(item, dict | list) and item:
                body = to_yaml(item, indent + 1)
                out.append(f"{pad}- {body.lstrip()}")
            else:
                out.append(f"{pad}- {_inline(item)}\n")
        return "".join(out)
    return pad + _inline(value) + "\n"


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return _scalar(str(value))


def _scalar(text: str) -> str:
    """Plain when YAML reads it back as the same string, else JSON-quoted (valid YAML)."""
    plain = text and text.strip() == text and not any(c in text for c in ":#{}[],&*!|>'\"%@`\n")
    special = text.lower() in ("null", "true", "false", "yes", "no", "on", "off", "~", "-")
    looks_numeric = text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()
    if plain and not special and not looks_numeric and not text.startswith(("-", "?")):
        return text
    return json.dumps(text)
