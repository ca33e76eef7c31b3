"""Pure rules: what a dependency's end means for its dependent (SPEC §4.4), and how a task
with children resolves (SPEC §4.3)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from velda.models import Children, DependencyKind, TaskStatus

S = TaskStatus


class Verdict(StrEnum):
    WAIT = "wait"
    MET = "met"
    FAILED_UPSTREAM = "FAILED_UPSTREAM"
    SKIPPED = "SKIPPED"


_TABLE: dict[TaskStatus, dict[DependencyKind, Verdict]] = {
    S.SUCCESS: {
        DependencyKind.SUCCESS: Verdict.MET,
        DependencyKind.FAIL: Verdict.SKIPPED,
        DependencyKind.ANY: Verdict.MET,
    },
    S.FAILURE: {
        DependencyKind.SUCCESS: Verdict.FAILED_UPSTREAM,
        DependencyKind.FAIL: Verdict.MET,
        DependencyKind.ANY: Verdict.MET,
    },
    S.SKIPPED: {
        DependencyKind.SUCCESS: Verdict.SKIPPED,
        DependencyKind.FAIL: Verdict.SKIPPED,
        DependencyKind.ANY: Verdict.MET,
    },
    S.CANCELLED: {
        DependencyKind.SUCCESS: Verdict.FAILED_UPSTREAM,
        DependencyKind.FAIL: Verdict.SKIPPED,
        DependencyKind.ANY: Verdict.MET,
    },
}
_TABLE[S.FAILED_UPSTREAM] = _TABLE[S.FAILURE]


def dependency_verdict(kind: DependencyKind, upstream: TaskStatus) -> Verdict:
    if not upstream.is_final():
        return Verdict.WAIT
    return _TABLE[upstream][kind]


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """Dependencies are ANDed; one that can no longer be met decides at once,
    FAILED_UPSTREAM before SKIPPED."""
    seen = set(verdicts)
    for decisive in (Verdict.FAILED_UPSTREAM, Verdict.SKIPPED, Verdict.WAIT):
        if decisive in seen:
            return decisive
    return Verdict.MET


def resolved_status(own_succeeded: bool, children: Children) -> TaskStatus:
    """The final status of a task whose own command ended and whose children are all final:
    fine when each of them succeeded or was skipped."""
    fine = own_succeeded and children.succeeded + children.skipped == children.total
    return S.SUCCESS if fine else S.FAILURE
