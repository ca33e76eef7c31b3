"""The example pipelines run unchanged, and do what their comments say."""

from __future__ import annotations

from pathlib import Path

from pipelines import assert_recursive_succeeded, make_data, parse_time, run_linear
from velda_cli import Velda


def test_linear_chains_process_train_eval(velda: Velda, example: Path) -> None:
    run_linear(velda, example)


def test_fanout_one_child_per_file_under_one_parent(velda: Velda, example: Path) -> None:
    make_data(velda, 6)
    parent_id = velda.run("./fanout.sh", check=True).stdout.strip()
    parent = velda.wait(parent_id)
    assert parent["status"] == "SUCCESS"
    children = velda.children(parent_id)
    assert sorted(c["name"] for c in children) == [f"data/part-{i:02d}.csv" for i in range(6)]
    assert all(c["status"] == "SUCCESS" and c["pool"] == "cpu-1" for c in children)
    assert parent["children"] == {
        "total": 6, "succeeded": 6, "failed": 0, "cancelled": 0, "skipped": 0, "running": 0,
        "queued": 0
    }
    assert parse_time(parent["resolved_at"]) >= max(
        parse_time(c["resolved_at"]) for c in children
    )
    assert sorted(p.name for p in (example / "clean").iterdir()) == [
        f"part-{i:02d}.csv" for i in range(6)
    ]
    # each child's stdout and stderr are kept apart
    first = velda.log(f"{parent_id}/data/part-00.csv")
    assert first.stdout == "part-00.csv: kept 200, dropped 1\n"
    assert first.stderr == "part-00.csv: dropped 1 bad rows\n"


def test_fanout_chunked_makes_ceil_n_over_5_children(velda: Velda, example: Path) -> None:
    make_data(velda, 12)
    parent_id = velda.run("./fanout_chunked.sh", check=True).stdout.strip()
    assert velda.wait(parent_id)["status"] == "SUCCESS"
    children = velda.children(parent_id)
    assert len(children) == 3
    assert [len(c["command"]) - 2 for c in children] == [5, 5, 2]
    assert len(list((example / "clean").iterdir())) == 12


def test_pipeline_train_waits_for_every_grandchild(velda: Velda, example: Path) -> None:
    make_data(velda, 6)
    preprocess_id, train_id, eval_id = velda.run("./pipeline.sh", check=True).stdout.split()
    evaluate = velda.wait(eval_id, timeout=120)
    assert evaluate["status"] == "SUCCESS"
    preprocess, train = velda.get(preprocess_id), velda.get(train_id)
    grandchildren = velda.children(preprocess_id)
    assert len(grandchildren) == 6 and all(c["status"] == "SUCCESS" for c in grandchildren)
    assert all(c["pool"] == "cpu-1" for c in grandchildren)
    latest = max(parse_time(c["resolved_at"]) for c in grandchildren)
    assert parse_time(train["started_at"]) >= latest
    assert parse_time(train["started_at"]) >= parse_time(preprocess["resolved_at"])


def test_recursive_two_levels(velda: Velda, example: Path) -> None:
    make_data(velda, 4)
    _, _, eval_id = velda.run("./pipeline.sh", check=True).stdout.split()
    assert velda.wait(eval_id, timeout=120)["status"] == "SUCCESS"
    root_id = velda.run("./recursive.sh", check=True).stdout.strip()
    assert velda.wait(root_id, timeout=120)["status"] == "SUCCESS"
    assert_recursive_succeeded(velda, root_id, example, files=4)
    inference = velda.get(f"{root_id}/data/part-00.csv/inference")
    assert inference["pool"] == "gpu-1"
