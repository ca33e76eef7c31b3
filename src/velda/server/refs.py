"""Turning a REF (an ID, a name, or a path of names) into a task, in a caller's scope."""

from __future__ import annotations

from velda.models import Task
from velda.protocol import MAX_ID, BadRequest
from velda.store.base import Store


class Resolver:
    def __init__(self, store: Store) -> None:
        self.store = store

    def resolve(self, ref: str, scope: int | None, field: str = "ref") -> Task:
        """An ID (digits), else the newest task of that exact name among the children of
        `scope` (the top level when None), else a path `a/b/c` walked from there. Names may
        hold `/` themselves (`pipeline/data/a.csv`): at each level the longest name that
        leads to a match wins."""
        task = self._by_id(ref, scope) or self.store.newest_named(scope, ref)
        if task is None and "/" in ref:
            task = self._walk(ref, scope, first=True)
        if task is None:
            where = "at the top level" if scope is None else f"among the children of {scope}"
            raise BadRequest(f"no task named '{ref}' {where}", field, status=404)
        return task

    def resolve_id(self, ref: str, scope: int | None, field: str = "ref") -> int:
        """resolve(...).id; a top-level caller's task ID is found without reading its row."""
        if scope is None and _is_id(ref) and self.store.statuses([int(ref)]):
            return int(ref)
        return self.resolve(ref, scope, field).id

    def _by_id(self, ref: str, scope: int | None) -> Task | None:
        if not _is_id(ref):
            return None
        task = self.store.get(int(ref))
        if task is not None and scope is not None and not self.within(task, scope):
            raise BadRequest(f"task {ref} is outside this task's subtree", "ref", status=403)
        return task

    def _walk(self, path: str, scope: int | None, first: bool = False) -> Task | None:
        cuts = [i for i, c in enumerate(path) if c == "/"] + [len(path)]
        for cut in reversed(cuts):
            name, rest = path[:cut], path[cut + 1 :]
            step = self._by_id(name, scope) if first else None
            step = step or self.store.newest_named(scope, name)
            if step is None:
                continue
            if cut == len(path):
                return step
            found = self._walk(rest, step.id)
            if found is not None:
                return found
        return None

    def within(self, task: Task, root: int) -> bool:
        """Is task `root` itself or one of its descendants?"""
        current: Task | None = task
        while current is not None:
            if current.id == root:
                return True
            current = self.store.get(current.parent_id) if current.parent_id else None
        return False


def _is_id(ref: str) -> bool:
    """ASCII digits ('²' is a digit to str.isdigit, yet no ID) of at most MAX_ID."""
    return ref.isascii() and ref.isdigit() and len(ref) <= 19 and int(ref) <= MAX_ID
