"""The OpenAPI description of the API, written out from one table of calls."""

from __future__ import annotations

from typing import Any

from velda import __version__

CALLS = [
    ("post", "/api/v1/tasks", "Submit a task", "SubmitRequest"),
    ("get", "/api/v1/tasks", "List or search tasks", None),
    ("get", "/api/v1/resolve", "Find the task a REF names", None),
    ("get", "/api/v1/tasks/{id}", "One task", None),
    ("get", "/api/v1/tasks/{id}/logs", "Raw stdout or stderr of an attempt", None),
    ("get", "/api/v1/tasks/{id}/output", "Both streams and status changes, framed", None),
    ("get", "/api/v1/tasks/{id}/events", "Server-sent events of the task's changes", None),
    ("post", "/api/v1/tasks/{id}/cancel", "Cancel a task and its subtree", None),
    ("post", "/api/v1/tasks/{id}/retry", "Re-run a task that did not succeed", None),
    ("post", "/api/v1/tasks/{id}/signal", "Send a signal to a running task", None),
    ("get", "/api/v1/pools", "Pools and their use", None),
    ("get", "/api/v1/server", "Server status", None),
    ("get", "/healthz", "Liveness (no token)", None),
    ("get", "/metrics", "Prometheus metrics", None),
]

SUBMIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"}},
        "pool": {"type": "string"},
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "after_success": {"type": "array", "items": {"type": "string"}},
        "after_fail": {"type": "array", "items": {"type": "string"}},
        "after": {"type": "array", "items": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "cwd": {"type": "string"},
        "priority": {"type": "integer"},
        "total_shards": {"type": "integer", "minimum": 1},
        "gang": {"type": "boolean"},
        "retries": {"type": "integer", "minimum": 0},
        "timeout": {"type": "string", "description": "90s, 30m, 2h, or seconds"},
        "blocking": {"type": "boolean"},
    },
}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body in CALLS:
        op: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
        if "{id}" in path:
            op["parameters"] = [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if body:
            schema = {"$ref": f"#/components/schemas/{body}"}
            op["requestBody"] = {"content": {"application/json": {"schema": schema}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "velda", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"SubmitRequest": SUBMIT_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
