"""Slurm hostlist / tasks-per-node expansion and the DeepSpeed hostfile built from them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.launcher.runner import _parse_hostfile

from l2e_dist.parallel.hostlist import deepspeed_hostfile, expand_hostlist, expand_tasks_per_node

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "n[1-3,5]": ["n1", "n2", "n3", "n5"],
    "gpu-[01-02]": ["gpu-01", "gpu-02"],
    "a1,b[2-3]": ["a1", "b2", "b3"],
    "n[8-11]": ["n8", "n9", "n10", "n11"],
    "n[08-11]": ["n08", "n09", "n10", "n11"],
    "x[009-011],y": ["x009", "x010", "x011", "y"],
    "r[1-2]n[1-2]": ["r1n1", "r1n2", "r2n1", "r2n2"],
    "node7": ["node7"],
    "gpu-[01-02],cpu[7,9]": ["gpu-01", "gpu-02", "cpu7", "cpu9"],
}


@pytest.mark.parametrize("hostlist", sorted(CASES))
def test_expand_hostlist(hostlist: str) -> None:
    assert expand_hostlist(hostlist) == CASES[hostlist]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (Slurm client) not installed")
@pytest.mark.parametrize("hostlist", sorted(CASES))
def test_expand_hostlist_matches_scontrol(hostlist: str, tmp_path: Path) -> None:
    # `scontrol show hostnames` needs a configuration source, not a running cluster: a two-line slurm.conf.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=hostlist\nSlurmctldHost=localhost\n")
    reference = subprocess.run(
        ["scontrol", "show", "hostnames", hostlist],
        capture_output=True, text=True, check=True, env={**os.environ, "SLURM_CONF": str(conf)},
    ).stdout.split()
    assert expand_hostlist(hostlist) == reference


@pytest.mark.parametrize("bad", ["", "n[1-", "n1-2]", "n[3-1]", "n[a-b]", "n[[1]]", "a,,b"])
def test_expand_hostlist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_hostlist(bad)


@pytest.mark.parametrize(
    ("spec", "counts"),
    [("2(x3),1", [2, 2, 2, 1]), ("8", [8]), ("4,2(x2)", [4, 2, 2]), ("1(x2)", [1, 1])],
)
def test_expand_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert expand_tasks_per_node(spec) == counts


def test_deepspeed_hostfile_mixed_tasks_per_node_parses_in_deepspeed() -> None:
    text = deepspeed_hostfile("gpu-[01-03],cpu7", "2(x3),1")
    assert text == "gpu-01 slots=2\ngpu-02 slots=2\ngpu-03 slots=2\ncpu7 slots=1\n"
    # The launcher's own parser is the reference for what DeepSpeed will make of it.
    assert dict(_parse_hostfile(text.splitlines())) == {"gpu-01": 2, "gpu-02": 2, "gpu-03": 2, "cpu7": 1}


def test_deepspeed_hostfile_rejects_count_mismatch() -> None:
    with pytest.raises(ValueError, match="3 hosts"):
        deepspeed_hostfile("n[1-3]", "2(x2)")


def test_hostfile_cli_reads_slurm_environment() -> None:
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "l2e_dist.parallel.hostlist", "hostfile"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert out == "n1 slots=2\nn2 slots=2\n"
