"""The OpenAPI description of the API, written out from one table of calls."""

from __future__ import annotations

from typing import Any

from velda import __version__
from velda.protocol import MAX_BATCH, MAX_ID, MAX_SHARDS, MAX_TERMINAL_SIDE, MAX_TIMEOUT_S

MAX_PAGE = 1000
MAX_ATTEMPT = 1_000_000

# Parameters, by name: (where, schema, description). Integers in a query are written as
# decimal digits; IDs fit in 63 bits.
_ID = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
_FLAG = {"type": "string", "enum": ["0", "1", "true", "false"]}
_ATTEMPT = {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT}
_OFFSET = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
PARAMETERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "id": ("path", _ID, "a task ID"),
    "parent": ("query", _ID, "only the children of this task, oldest first"),
    "all": ("query", _FLAG, "every task, not only the top level"),
    "status": ("query", {"type": "string"}, "only these states, comma-separated"),
    "label": ("query", {"type": "string", "pattern": "^[^=]+=.*$"}, "KEY=VALUE; repeat to AND"),
    "q": ("query", {"type": "string"}, "text in the name or command"),
    "page_size": ("query", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "default 50"),
    "page_token": ("query", _ID, "next_page_token of the previous page"),
    "ref": ("query", {"type": "string", "minLength": 1}, "a task ID, name or path of names"),
    "subtree": ("query", _FLAG, "also count (or follow) the whole subtree"),
    "show_env": ("query", _FLAG, "the environment unmasked (server token only)"),
    "stream": ("query", {"type": "string", "enum": ["stdout", "stderr", "combined"]},
               "default stdout; combined: both, in the order written"),
    "attempt": ("query", _ATTEMPT, "default: the latest"),
    "offset": ("query", _OFFSET, "byte offset to start from"),
    "follow": ("query", _FLAG, "keep streaming until the task ends"),
    "framed": ("query", _FLAG, "combined: each piece as `o LEN\\n` or `e LEN\\n` + bytes"),
    "tail": ("query", {"type": "integer", "minimum": 0, "maximum": MAX_ID},
             "combined: the last N bytes; X-Velda-Offset says where they start"),
    "from_attempt": ("query", _ATTEMPT, "resume /output from this attempt"),
    "stdout_offset": ("query", _OFFSET, "resume /output at this stdout offset"),
    "stderr_offset": ("query", _OFFSET, "resume /output at this stderr offset"),
    "here": ("query", _FLAG, "a client over loopback reads the output from the log files: "
             "frames `O`/`E` + `OFFSET LENGTH PATH` say where the bytes are"),
    "Idempotency-Key": ("header", {"type": "string", "maxLength": 200},
                        "the same key again returns what the first request made"),
}

_TASK_ID_PARAMS = ["id"]
# (method, path, summary, request body, parameters, success status, success content, errors)
CALLS: list[tuple[str, str, str, str | None, list[str], str, str, list[str]]] = [
    ("post", "/api/v1/tasks", "Submit a task", "SubmitRequest", ["Idempotency-Key"], "201",
     "Task", ["400", "403", "404", "409", "413", "507"]),
    ("post", "/api/v1/tasks:batch", "Submit many tasks at once, all or none", "SubmitBatch",
     ["Idempotency-Key"], "201", "Submitted", ["400", "403", "404", "409", "413", "507"]),
    ("get", "/api/v1/tasks", "List or search tasks", None,
     ["parent", "all", "status", "label", "q", "page_size", "page_token"], "200", "TaskPage",
     ["400", "403"]),
    ("get", "/api/v1/resolve", "Find the task a REF names", None, ["ref", "show_env"], "200",
     "Task", ["400", "403", "404"]),
    ("get", "/api/v1/tasks/{id}", "One task", None, ["id", "subtree", "show_env"], "200",
     "Task", ["400", "403", "404"]),
    ("get", "/api/v1/tasks/{id}/logs", "Raw stdout or stderr of an attempt", None,
     ["id", "stream", "attempt", "offset", "follow", "framed", "tail"], "200", "bytes",
     ["400", "403", "404"]),
    ("get", "/api/v1/tasks/{id}/output", "Both streams and status changes, framed", None,
     ["id", "attempt", "follow", "from_attempt", "stdout_offset", "stderr_offset", "here"],
     "200",
     "frames", ["400", "403", "404"]),
    ("get", "/api/v1/tasks/{id}/events", "Server-sent events of the task's changes", None,
     ["id", "subtree"], "200", "events", ["400", "403", "404"]),
    ("post", "/api/v1/tasks/{id}/cancel", "Cancel a task and its subtree", None, ["id"], "200",
     "Task", ["400", "403", "404", "413", "507"]),
    ("post", "/api/v1/tasks/{id}/retry", "Re-run a task that did not succeed", None,
     ["id", "Idempotency-Key"], "200", "Task", ["400", "403", "404", "409", "413", "507"]),
    ("post", "/api/v1/tasks/{id}/signal", "Send a signal to a running task", "SignalRequest",
     ["id"], "200", "Ok", ["400", "403", "404", "409", "413"]),
    ("post", "/api/v1/tasks/{id}/terminal", "Type into (or resize) a task's terminal",
     "TerminalInput", ["id"], "200", "Ok", ["400", "403", "404", "409", "413"]),
    ("get", "/api/v1/tasks/{id}/usage", "What an attempt used, sample by sample", None,
     ["id", "attempt"], "200", "Usage", ["400", "403", "404"]),
    ("get", "/api/v1/pools", "Pools and their use", None, [], "200", "Pools", []),
    ("get", "/api/v1/server", "Server status", None, [], "200", "Server", []),
    ("post", "/api/v1/server/reload", "Read velda.toml again", None, [], "200", "object",
     ["400", "403"]),
    ("post", "/api/v1/login-links", "A one-time web login link (server token only)", None, [],
     "200", "LoginLink", ["403"]),
    ("get", "/api/v1/openapi.json", "This document (no token)", None, [], "200", "object", []),
    ("get", "/healthz", "Liveness (no token)", None, [], "200", "Health", []),
    ("get", "/metrics", "Prometheus metrics", None, [], "200", "text", []),
]
PUBLIC = {"/healthz", "/api/v1/openapi.json"}

ERRORS = {
    "400": "Bad input; `field` names the request field at fault",
    "401": "Missing or invalid token",
    "403": "Not allowed with this token (outside a task's subtree, say)",
    "404": "No such task",
    "409": "Not in a state that allows it (not running, not ended, succeeded)",
    "413": "The request body is larger than the server takes (`max_request_bytes`)",
    "507": "No space left for the store",
}

_NULL_STR = {"type": ["string", "null"]}
_NULL_INT = {"type": ["integer", "null"]}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}
_SIDE = {"type": "integer", "minimum": 1, "maximum": MAX_TERMINAL_SIDE}
TERMINAL_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"], "required": ["rows", "cols"], "additionalProperties": False,
    "properties": {"rows": _SIDE, "cols": _SIDE},
}
_NULL_NUM = {"type": ["number", "null"]}
USAGE_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "description": "what the attempt used (local and Ray pools; CPU totals on Slurm): "
                   "docs/api.md",
    "properties": {
        "cpu_user_s": {"type": "number"}, "cpu_system_s": {"type": "number"},
        "cpu_s": {"type": "number"}, "cpu_percent": _NULL_NUM,
        "memory_bytes": _NULL_INT, "peak_memory_bytes": _NULL_INT, "processes": _NULL_INT,
        "samples": {"type": "integer"}, "final": {"type": "boolean"},
        "gpus": {"type": "array", "items": {"type": "object"}},
    },
}
TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "status", "pool", "command", "labels", "created_at", "children"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "name": _NULL_STR,
        "status": {"type": "string"},
        "pool": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "cwd": {"type": "string"},
        "parent_id": _NULL_STR,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "priority": {"type": "integer"},
        "attempt": {"type": "integer"},
        "retries": {"type": "integer"},
        "timeout_s": {"type": ["number", "null"]},
        "exit_code": _NULL_INT,
        "signal": _NULL_INT,
        "reason": _NULL_STR,
        "created_at": _NULL_TIME,
        "started_at": _NULL_TIME,
        "finished_at": _NULL_TIME,
        "resolved_at": _NULL_TIME,
        "depends_on": {"type": "array", "items": {"type": "object"}},
        "children": _COUNTS,
        "shard_id": _NULL_INT,
        "total_shards": _NULL_INT,
        "gang": {"type": "boolean"},
        "terminal": {**TERMINAL_SCHEMA, "description": "the size it started with, if it runs "
                     "under a terminal (vrun at a terminal)"},
        "waiting_for": {
            "type": ["object", "null"],
            "description": "why a PENDING or QUEUED task has not started (docs/api.md)",
            "required": ["reason", "message"],
            "properties": {"reason": {"type": "string"}, "message": {"type": "string"},
                           "never": {"type": "boolean"}},
        },
        "usage": USAGE_SCHEMA,
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "forwarded_ports": {
            "type": "array",
            "description": "ports forwarded now (one task only): the WebSocket "
                           "/api/v1/tasks/{id}/ports/{port}, docs/api.md",
            "items": {"type": "object", "required": ["port", "local"],
                      "properties": {"port": {"type": "integer"}, "local": _NULL_INT}},
        },
    },
}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}, "field": _NULL_STR},
    },
    "Task": TASK_SCHEMA,
    "TaskPage": {
        "type": "object",
        "required": ["tasks", "next_page_token"],
        "properties": {
            "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
            "next_page_token": _NULL_STR,
        },
    },
    "Usage": {
        "type": "object",
        "required": ["attempt", "usage", "samples"],
        "properties": {
            "attempt": {"type": "integer"},
            "usage": USAGE_SCHEMA,
            "samples": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Ok": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    "SubmitBatch": {
        "type": "object", "required": ["tasks"], "additionalProperties": False,
        "properties": {"tasks": {
            "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
            "items": {"$ref": "#/components/schemas/SubmitRequest"},
            "description": "in order: a task may name an earlier one of the same batch"}},
    },
    "Submitted": {
        "type": "object", "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": {
            "type": "object", "required": ["id", "status", "pool"],
            "properties": {"id": {"type": "string", "pattern": "^[0-9]+$"}, "name": _NULL_STR,
                           "status": {"type": "string"}, "pool": {"type": "string"}}}}},
    },
    "Health": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
    "Pools": {
        "type": "object",
        "required": ["pools"],
        "properties": {"pools": {"type": "array", "items": {"type": "object"}},
                       "machine": _COUNTS | {"additionalProperties": {"type": "number"}}},
    },
    "Server": {"type": "object", "properties": {"url": {"type": "string"},
                                                "version": {"type": "string"},
                                                "config": {"type": "object"}}},
    "LoginLink": {"type": "object", "required": ["url"],
                  "properties": {"url": {"type": "string"}}},
    "SignalRequest": {
        "type": "object",
        "required": ["signal"],
        "properties": {"signal": {"type": "integer", "minimum": 1, "maximum": 64}},
    },
    "TerminalInput": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "data": {"type": "string", "contentEncoding": "base64",
                     "description": "bytes typed into the task's terminal, in base64"},
            "size": {**TERMINAL_SCHEMA, "description": "the terminal's new size"},
        },
    },
    "object": {"type": "object"},
}
_MEDIA = {
    "bytes": "application/octet-stream",
    "frames": "application/x-velda-frames",
    "events": "text/event-stream",
    "text": "text/plain",
}

SUBMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"}},
        "pool": {"type": ["string", "null"]},
        "name": {"type": ["string", "null"], "minLength": 1, "maxLength": 200},
        "after_success": {"type": "array", "items": {"type": "string"}},
        "after_fail": {"type": "array", "items": {"type": "string"}},
        "after": {"type": "array", "items": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"},
                "propertyNames": {"minLength": 1, "pattern": "^[^=]+$"}},
        "cwd": {"type": ["string", "null"], "description": "an absolute path"},
        "priority": {"type": "integer", "minimum": -(10**9), "maximum": 10**9},
        "total_shards": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_SHARDS},
        "gang": {"type": "boolean"},
        "retries": {"type": "integer", "minimum": 0, "maximum": 1000},
        "timeout": {
            "type": ["string", "number", "null"],
            "description": "90s, 30m, 2h, 1.5d, or seconds; more than 0, at most 30 days",
        },
        "timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                      "maximum": MAX_TIMEOUT_S},
        "blocking": {"type": "boolean"},
        "terminal": {**TERMINAL_SCHEMA, "description": "run under a terminal of this size; "
                     "its input through POST /api/v1/tasks/{id}/terminal"},
    },
    "additionalProperties": False,
}


_BODY_REQUIRED = ("SignalRequest", "TerminalInput", "SubmitBatch")


def _operation(call: tuple[str, str, str, str | None, list[str], str, str, list[str]]) -> Any:
    _, path, summary, body, names, ok, content, errors = call
    op: dict[str, Any] = {"summary": summary, "responses": {ok: _response("OK", content)}}
    if ok == "201":  # the same Idempotency-Key again: what the first request made
        op["responses"]["200"] = _response("Made before, under this Idempotency-Key", content)
    if names:
        op["parameters"] = [_parameter(name) for name in names]
    if body:
        schema = {"$ref": f"#/components/schemas/{body}"}
        op["requestBody"] = {"required": body in _BODY_REQUIRED,
                             "content": {"application/json": {"schema": schema}}}
    codes = errors if path in PUBLIC else [*errors, "401"]
    for code in sorted(codes):
        op["responses"][code] = _response(ERRORS[code], "Error")
    if path in PUBLIC:
        op["security"] = []
    return op


def _parameter(name: str) -> dict[str, Any]:
    where, schema, description = PARAMETERS[name]
    return {"name": name, "in": where, "required": where == "path", "schema": schema,
            "description": description}


def _response(description: str, content: str) -> dict[str, Any]:
    if content == "events":  # each event: `event: task` and `data:` the task as JSON
        event = {"type": "object", "properties": {"event": {"type": "string"},
                                                  "data": {"type": "string"}}}
        return {"description": description, "content": {_MEDIA[content]: {"schema": event}}}
    if content in _MEDIA:
        return {"description": description,
                "content": {_MEDIA[content]: {"schema": {"type": "string"}}}}
    schema = {"$ref": f"#/components/schemas/{content}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for call in CALLS:
        paths.setdefault(call[1], {})[call[0]] = _operation(call)
    return {
        "openapi": "3.1.0",
        "info": {"title": "velda", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"SubmitRequest": SUBMIT_SCHEMA, **SCHEMAS},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
