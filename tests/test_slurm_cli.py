"""What velda reads from the Slurm commands (engines/slurm_cli.py): the formats it parses, and
the real commands of the two-node test cluster, reached through its network namespace."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster
from velda.engines.base import EngineError
from velda.engines.slurm_cli import Accounted, Node, SlurmCommands, _parse_accounted, _parse_node


def test_sinfo_node_lines_give_cpus_and_gpus_in_all_and_allocated() -> None:
    assert _parse_node("n1|mix|1/3/0/4|gpu:fake:2(S:0-1)|gpu:fake:1(IDX:0)|") == Node(
        "n1", "mix", 4, 1, 2, 1)
    assert _parse_node("cpu7|idle|0/64/0/64|(null)|gpu:0|") == Node(
        "cpu7", "idle", 64, 0, 0, 0)
    assert _parse_node("g2|down*|0/0/8/8|gpu:a100:4,shard:8|gpu:a100:0(IDX:N/A),shard:0|") == (
        Node("g2", "down*", 8, 0, 4, 0))


def test_sacct_lines_give_state_exit_code_and_signal() -> None:
    assert _parse_accounted("123|COMPLETED|0:0") == ("123", Accounted("COMPLETED", 0, 0))
    assert _parse_accounted("124_3|FAILED|3:0") == ("124_3", Accounted("FAILED", 3, 0))
    assert _parse_accounted("125|CANCELLED by 0|0:15") == ("125", Accounted("CANCELLED", 0, 15))


@pytest.fixture
def commands(slurm: SlurmCluster, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmCommands]:
    """The Slurm commands on PATH as scripts that run the real ones in the cluster's
    namespace, as test_slurm_engine.py does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    enter = " ".join(slurm.prefix)
    for tool in ("sbatch", "squeue", "scancel", "sinfo", "sacct"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nexec {enter} /usr/bin/{tool} "$@"\n')
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    yield SlurmCommands(slurm.env["SLURM_CONF"])


def test_nodes_of_the_partition_come_from_one_sinfo(commands: SlurmCommands) -> None:
    nodes = asyncio.run(commands.nodes("debug"))
    assert [n.name for n in nodes] == ["n1", "n2"]
    assert all(n.cpus >= 2 and n.gpus == 1 for n in nodes), nodes


def test_a_cluster_without_accounting_is_asked_once(commands: SlurmCommands) -> None:
    job = asyncio.run(commands.sbatch(["--wrap", "true", "--output=/dev/null"]))
    assert asyncio.run(commands.accounted([job])) == {}
    assert commands.accounting is False  # the test cluster keeps no accounting


def test_an_unreachable_controller_is_an_error_naming_slurmctld(slurm: SlurmCluster,
                                                                tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"  # the cluster's, but outside its namespace nothing answers
    conf.write_text(Path(slurm.env["SLURM_CONF"]).read_text())
    with pytest.raises(EngineError, match="^slurmctld is not reachable: "):
        asyncio.run(SlurmCommands(str(conf)).partitions())
