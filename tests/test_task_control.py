"""Shards, gang, retries, timeouts, retry, priority, labels, watch, output formats, pools
(SPEC §3, §4.5, §4.6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines import parse_time
from velda_cli import Velda

SLOTS = """
[pools.slot2]
engine = "local"
cpus = 1
capacity = 2

[pools.one]
engine = "local"
cpus = 1
capacity = 1
"""


def gate_script(gate: Path, then: str = "true") -> str:
    return f"while [ ! -e {gate} ]; do sleep 0.02; done; {then}"


def test_shards_see_their_id_and_the_parent_resolves_from_them(velda: Velda) -> None:
    parent = velda.vbatch("-N", "4", "--name", "sharded", "sh", "-c",
                          'echo "$VELDA_SHARD_ID/$VELDA_TOTAL_SHARDS"')
    task = velda.wait(parent)
    assert task["status"] == "SUCCESS"
    assert task["command"] == [] and task["total_shards"] == 4
    shards = velda.children(parent)
    assert [s["name"] for s in shards] == ["0", "1", "2", "3"]
    assert [velda.log(s["id"]).stdout for s in shards] == [f"{i}/4\n" for i in range(4)]
    assert velda.log("sharded/2").stdout == "2/4\n"


def test_a_failed_shard_fails_the_parent(velda: Velda) -> None:
    parent = velda.vbatch("-N", "3", "sh", "-c", '[ "$VELDA_SHARD_ID" != 1 ]')
    assert velda.wait(parent)["status"] == "FAILURE"
    assert [s["status"] for s in velda.children(parent)] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert velda.run("vbatch", "-f", "-q", "-N", "2", "false").returncode == 1


def test_gang_larger_than_the_pool_is_an_error_at_submit(velda: Velda) -> None:
    velda.configure(SLOTS)
    result = velda.run("vbatch", "-P", "slot2", "-N", "3", "--gang", "true")
    assert result.returncode == 2
    assert "gang of 3 can never run at once in pool slot2: it fits at most 2" in result.stderr


def test_gang_starts_all_or_nothing_and_is_not_starved(velda: Velda, tmp_path: Path) -> None:
    velda.configure(SLOTS)
    gate = tmp_path / "gate"
    blocker = velda.vbatch("-P", "slot2", "bash", "-c", gate_script(gate))
    velda.wait(blocker, until={"RUNNING"})
    gang = velda.vbatch("-P", "slot2", "-N", "2", "--gang", "--name", "gang", "true")
    small = [velda.vbatch("-P", "slot2", "true") for _ in range(3)]
    shards = velda.children(gang)
    # one slot is free, but a gang of two must not take it alone, and the small tasks queued
    # behind the gang must not take it either
    assert [s["status"] for s in shards] == ["QUEUED", "QUEUED"]
    assert all(velda.get(t)["status"] == "QUEUED" for t in small)
    gate.touch()
    assert velda.wait(gang)["status"] == "SUCCESS"
    starts = [parse_time(s["started_at"]) for s in velda.children(gang)]
    assert min(starts) >= parse_time(velda.get(blocker)["finished_at"])
    for t in small:
        assert parse_time(velda.wait(t)["started_at"]) >= min(starts)


def test_retries_keep_every_attempts_logs(velda: Velda, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    script = (
        f'n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; '
        'echo "attempt $VELDA_ATTEMPT"; echo "err $VELDA_ATTEMPT" >&2; [ $n -ge 3 ]'
    )
    task_id = velda.vbatch("--retries", "2", "--name", "flaky", "bash", "-c", script)
    task = velda.wait(task_id)
    assert (task["status"], task["attempt"]) == ("SUCCESS", 3)
    assert [a["exit_code"] for a in task["attempts"]] == [1, 1, 0]
    for k in (1, 2, 3):
        log = velda.log("flaky", "--attempt", str(k))
        assert (log.stdout, log.stderr) == (f"attempt {k}\n", f"err {k}\n")
    assert velda.log("flaky").stdout == "attempt 3\n"


def test_timeout_kills_the_attempt(velda: Velda) -> None:
    result = velda.run("vrun", "--timeout", "1s", "bash", "-c", "echo start; sleep 30")
    assert result.stdout == "start\n"
    assert result.returncode == 128 + 15
    task = velda.get(velda.run("velda", "task", "list", "-o", "id", "--header=false",
                               check=True).stdout.split()[0])
    assert (task["status"], task["reason"], task["signal"]) == ("FAILURE", "timeout", 15)
    assert parse_time(task["finished_at"]) - parse_time(task["started_at"]) < 15


def test_retry_of_a_fanout_reruns_only_the_failed(velda: Velda, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    child = f'sh -c "[ {{}} -lt 4 ] || [ -e {fixed} ]"'
    parent = velda.vbatch("bash", "-c", f"seq 1 6 | xargs -I{{}} vbatch --name c{{}} {child}")
    task = velda.wait(parent)
    assert task["status"] == "FAILURE"
    assert task["children"]["failed"] == 3
    dependent = velda.vbatch("--after-success", parent, "echo", "downstream")
    assert velda.wait(dependent)["status"] == "FAILED_UPSTREAM"
    fixed.touch()
    velda.run("velda", "task", "retry", parent, check=True)
    assert velda.wait(parent)["status"] == "SUCCESS"
    attempts = {c["name"]: c["attempt"] for c in velda.children(parent)}
    assert attempts == {"c1": 1, "c2": 1, "c3": 1, "c4": 2, "c5": 2, "c6": 2}
    assert velda.get(parent)["attempt"] == 1  # the parent's own command did not re-run
    assert velda.wait(dependent)["status"] == "SUCCESS"
    assert velda.log(dependent).stdout == "downstream\n"
    again = velda.run("velda", "task", "retry", parent)
    assert again.returncode == 2 and "succeeded; nothing to retry" in again.stderr


def test_priority_lower_first_fifo_within(velda: Velda, tmp_path: Path) -> None:
    velda.configure(SLOTS)
    gate = tmp_path / "gate"
    blocker = velda.vbatch("-P", "one", "bash", "-c", gate_script(gate))
    velda.wait(blocker, until={"RUNNING"})
    names = [("a", "5"), ("b", "0"), ("c", "-3"), ("d", "0"), ("e", "-3")]
    for name, priority in names:
        velda.vbatch("-P", "one", "--name", name, "--priority", priority, "true")
    gate.touch()
    tasks = [velda.wait(name) for name, _ in names]
    order = [t["name"] for t in sorted(tasks, key=lambda t: parse_time(t["started_at"]))]
    assert order == ["c", "e", "b", "d", "a"]


def test_search_ands_labels_newest_first(velda: Velda) -> None:
    a = velda.vbatch("-l", "team=ml", "-l", "stage=train", "true")
    velda.vbatch("-l", "team=ml", "-l", "stage=eval", "true")
    c = velda.vbatch("-l", "team=ml", "-l", "stage=train", "false")
    velda.wait(c)
    out = velda.run("velda", "task", "search", "-l", "team=ml", "-l", "stage=train",
                    "-o", "json", check=True).stdout
    assert [t["id"] for t in json.loads(out)["tasks"]] == [c, a]
    failed = velda.run("velda", "task", "search", "-l", "team=ml", "--status", "FAILURE",
                       "-o", "id", "--header=false", check=True).stdout.split()
    assert failed == [c]
    pool = velda.run("velda", "task", "search", "-l", "pool=shell", "-o", "id",
                     "--header=false", check=True).stdout.split()
    assert len(pool) == 3


def test_children_carry_parent_and_pool_labels(velda: Velda) -> None:
    alone = velda.vbatch("-q", "-P", "cpu-1", "true")
    assert velda.get(alone)["labels"] == {"pool": "cpu-1"}
    root = velda.vbatch("bash", "-c", "vbatch true")
    velda.wait(root)
    assert velda.children(root)[0]["labels"] == {"pool": "shell", "parent": root}


def test_watch_prints_progress_lines_when_not_a_terminal(velda: Velda) -> None:
    parent = velda.vbatch("bash", "-c", "for i in 1 2 3; do vbatch sleep 0.3; done; vbatch false")
    result = velda.run("velda", "task", "watch", parent)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[-1] == f"task {parent}: 4/4 done: 3 succeeded, 1 failed, 0 running, 0 queued"
    assert f"task {parent}: FAILURE" in result.stderr


def test_output_formats_parse(velda: Velda) -> None:
    task_id = velda.vbatch("--name", "fmt", "-l", "k=v: x", "echo", "hi")
    velda.wait(task_id)
    as_json = json.loads(velda.run("velda", "task", "get", "fmt", "-o", "json",
                                   check=True).stdout)
    as_yaml = yaml.safe_load(velda.run("velda", "task", "get", "fmt", "-o", "yaml",
                                       check=True).stdout)
    assert as_yaml == as_json
    assert as_json["labels"]["k"] == "v: x"
    fields = velda.run("velda", "task", "get", "fmt", "-o", "id,name,status", check=True).stdout
    assert fields.split() == ["ID", "NAME", "STATUS", task_id, "fmt", "SUCCESS"]
    bare = velda.run("velda", "task", "get", "fmt", "-o", "name,status", "--header=false",
                     check=True).stdout
    assert bare == "fmt  SUCCESS\n"
    wide = velda.run("velda", "task", "list", "-o", "wide", check=True).stdout
    assert "EXIT_CODE" in wide.splitlines()[0] and "echo hi" in wide
    listed = yaml.safe_load(velda.run("velda", "task", "list", "-o", "yaml", check=True).stdout)
    assert listed["tasks"][0]["id"] == task_id and listed["next_page_token"] is None


def test_list_pages(velda: Velda) -> None:
    ids = [velda.vbatch("true") for _ in range(5)]
    first = json.loads(velda.run("velda", "task", "list", "--max-results", "2", "-o", "json",
                                 check=True).stdout)
    assert [t["id"] for t in first["tasks"]] == ids[::-1][:2]
    second = json.loads(velda.run("velda", "task", "list", "--max-results", "2", "--page-token",
                                  first["next_page_token"], "-o", "json", check=True).stdout)
    assert [t["id"] for t in second["tasks"]] == ids[::-1][2:4]
    everything = json.loads(velda.run("velda", "task", "list", "--max-results", "2", "-a",
                                      "-o", "json", check=True).stdout)
    assert [t["id"] for t in everything["tasks"]] == ids[::-1]
    velda.wait(ids[-1])
    only = velda.run("velda", "task", "list", "--status", "SUCCESS", "-o", "id",
                     "--header=false", check=True).stdout.split()
    assert set(only) <= set(ids)
    bad = velda.run("velda", "task", "list", "--status", "DONE")
    assert bad.returncode == 2 and "unknown status 'DONE'" in bad.stderr


def test_pool_list(velda: Velda) -> None:
    velda.configure(SLOTS)
    velda.vbatch("-P", "cpu-2", "true")
    pools = json.loads(velda.run("velda", "pool", "list", "-o", "json", check=True).stdout)
    by_name = {p["name"]: p for p in pools["pools"]}
    assert {"shell", "slot2", "one"} <= set(by_name)
    assert by_name["slot2"]["capacity"] == 2 and by_name["slot2"]["engine"] == "local"
    assert by_name["shell"]["resources"]["cpus"] == 1
    table = velda.run("velda", "pool", "list", check=True).stdout
    assert table.splitlines()[0].split()[:4] == ["NAME", "ENGINE", "RESOURCES", "CAPACITY"]


@pytest.mark.parametrize(
    "argv",
    [["vrun"], ["vbatch"], ["velda"], ["velda", "task", "log"], ["velda", "task", "get"],
     ["velda", "task", "list"], ["velda", "task", "search"], ["velda", "task", "watch"],
     ["velda", "task", "cancel"], ["velda", "task", "retry"], ["velda", "pool", "list"],
     ["velda", "server", "start"], ["velda", "server", "stop"], ["velda", "server", "status"],
     ["velda", "ui"]],
)
def test_every_help_has_a_summary_and_an_example(velda: Velda, argv: list[str]) -> None:
    out = velda.run(*argv, "--help", check=True).stdout
    assert "example" in out
    assert out.strip().splitlines()[0].startswith("usage:")
