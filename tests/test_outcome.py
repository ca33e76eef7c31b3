"""SPEC §4.3 and §4.4 as pure rules."""

from __future__ import annotations

import pytest

from velda.models import Children
from velda.models import DependencyKind as K
from velda.models import TaskStatus as S
from velda.outcome import Verdict as V
from velda.outcome import combine, dependency_verdict, resolved_status

TABLE = [
    (S.SUCCESS, V.MET, V.SKIPPED, V.MET),
    (S.FAILURE, V.FAILED_UPSTREAM, V.MET, V.MET),
    (S.FAILED_UPSTREAM, V.FAILED_UPSTREAM, V.MET, V.MET),
    (S.SKIPPED, V.SKIPPED, V.SKIPPED, V.MET),
    (S.CANCELLED, V.FAILED_UPSTREAM, V.SKIPPED, V.MET),
]


@pytest.mark.parametrize(("upstream", "success", "fail", "any_"), TABLE)
def test_dependency_table(upstream: S, success: V, fail: V, any_: V) -> None:
    assert dependency_verdict(K.SUCCESS, upstream) == success
    assert dependency_verdict(K.FAIL, upstream) == fail
    assert dependency_verdict(K.ANY, upstream) == any_


@pytest.mark.parametrize("upstream", [S.PENDING, S.QUEUED, S.RUNNING, S.RUNNING_SUBTASKS])
def test_unfinished_upstream_waits(upstream: S) -> None:
    assert dependency_verdict(K.ANY, upstream) == V.WAIT


def test_one_dependency_that_cannot_be_met_decides_at_once() -> None:
    assert combine([V.WAIT, V.SKIPPED]) == V.SKIPPED
    assert combine([V.SKIPPED, V.FAILED_UPSTREAM, V.WAIT]) == V.FAILED_UPSTREAM
    assert combine([V.MET, V.WAIT]) == V.WAIT
    assert combine([V.MET, V.MET]) == V.MET
    assert combine([]) == V.MET


def children(*statuses: S) -> Children:
    counted = Children()
    for status in statuses:
        counted.count(status)
    return counted


def test_parent_outcome() -> None:
    assert resolved_status(True, children(S.SUCCESS, S.SKIPPED)) == S.SUCCESS
    assert resolved_status(True, children(S.SUCCESS, S.FAILED_UPSTREAM)) == S.FAILURE
    assert resolved_status(True, children(S.SUCCESS, S.CANCELLED)) == S.FAILURE
    assert resolved_status(False, children(S.SUCCESS)) == S.FAILURE  # its own exit code counts
    assert resolved_status(True, children()) == S.SUCCESS
