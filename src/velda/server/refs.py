"""Turning a REF (an ID, a name, or a path of names) into a task, in a caller's scope."""

from __future__ import annotations

from velda.models import Task
from velda.protocol import BadRequest
from velda.store.sqlite import SqliteStore


class Resolver:
    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def resolve(self, ref: str, scope: int | None, field: str = "ref") -> Task:
        """An ID (digits), else the newest task of that exact name among the children of
        `scope` (the top level when None), else a path `a/b/c` walked from there."""
        task = self._by_id(ref, scope) or self.store.newest_named(scope, ref)
        if task is None and "/" in ref:
            task = self._walk(ref.split("/"), scope)
        if task is None:
            where = "at the top level" if scope is None else f"among the children of {scope}"
            raise BadRequest(f"no task named '{ref}' {where}", field, status=404)
        return task

    def _by_id(self, ref: str, scope: int | None) -> Task | None:
        if not ref.isdigit():
            return None
        task = self.store.get(int(ref))
        if task is not None and scope is not None and not self.within(task, scope):
            raise BadRequest(f"task {ref} is outside this task's subtree", "ref", status=403)
        return task

    def _walk(self, parts: list[str], scope: int | None) -> Task | None:
        task: Task | None = None
        for i, part in enumerate(parts):
            if i == 0:
                task = self._by_id(part, scope) or self.store.newest_named(scope, part)
            else:
                assert task is not None
                task = self.store.newest_named(task.id, part)
            if task is None:
                return None
        return task

    def within(self, task: Task, root: int) -> bool:
        """Is task `root` itself or one of its descendants?"""
        current: Task | None = task
        while current is not None:
            if current.id == root:
                return True
            current = self.store.get(current.parent_id) if current.parent_id else None
        return False
