"""Publishing like Pythia: `l2e-convert to-hf RUN REPO --all --git --dtype float16` writes one git repository
with a step<N> branch per snapshot and main at the last step, weights through git-lfs. Pushed to a local bare
repository and cloned on a machine with no git configuration, the clone's history holds LFS pointers, `git lfs
pull` gives the real files (sha256 = the pointer's oid), and the checked-out step4 loads in transformers with the
logits of our model holding the same fp16-rounded weights; `--dtype` sets config.json's torch_dtype."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.tiny_snapshot_run import SNAPSHOT_STEPS, our_logits, train_snapshot_run

TOKENS = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(5))

def _has_git_lfs() -> bool:
    return shutil.which("git") is not None and subprocess.run(["git", "lfs", "version"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _has_git_lfs(), reason="needs git-lfs (apt-get install -y git-lfs)")


def _git(*args: str, env: dict[str, str], cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _bare_env(home: Path, **extra: str) -> dict[str, str]:
    """A machine with no git configuration: an empty HOME, no system config, no identity."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "GIT_CONFIG_NOSYSTEM": "1",
            "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_git_repository_pushes_clones_and_loads_step4_with_our_logits(tmp_path, data_cache):
    from safetensors import safe_open
    from transformers import GPTNeoXForCausalLM

    run = train_snapshot_run(tmp_path / "run", data_cache)
    repo, env = tmp_path / "pythia-tiny", _bare_env(tmp_path / "home")
    early = tmp_path / "early"  # the run as it was before its last snapshot: the repository grows with the run
    for step in SNAPSHOT_STEPS[:-1]:
        shutil.copytree(run / "snapshots" / f"step{step}", early / "snapshots" / f"step{step}")
    for source, made in ((early, len(SNAPSHOT_STEPS) - 1), (run, 1)):
        proc = subprocess.run([sys.executable, "-m", "launcher.convert", "to-hf", str(source), str(repo), "--all",
                               "--git", "--dtype", "float16"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{made} snapshots committed" in proc.stdout

    branches = dict(line.split() for line in _git("for-each-ref", "--format=%(refname:short) %(objectname)",
                                                   "refs/heads", env=env, cwd=repo).splitlines())
    assert sorted(branches) == sorted(["main", *(f"step{s}" for s in SNAPSHOT_STEPS)])
    assert branches["main"] == branches[f"step{SNAPSHOT_STEPS[-1]}"]  # main = the last step
    history = _git("log", "--format=%H", "main", env=env, cwd=repo).split()
    assert history == [branches[f"step{s}"] for s in reversed(SNAPSHOT_STEPS)]  # linear, in step order
    configs = [json.loads(_git("show", f"step{s}:config.json", env=env, cwd=repo)) for s in SNAPSHOT_STEPS]
    assert all(config == configs[0] for config in configs)  # one architecture across the branches
    assert configs[0]["torch_dtype"] == "float16" and configs[0]["architectures"] == ["GPTNeoXForCausalLM"]
    assert _git("status", "--porcelain", env=env, cwd=repo) == ""  # the work tree shows main, nothing pending

    remote = tmp_path / "remote.git"
    _git("init", "-q", "--bare", "--initial-branch", "main", str(remote), env=env)
    url = remote.resolve().as_uri()  # git-lfs needs a URL (file://) for a local remote
    _git("push", "-q", url, "--all", env=env, cwd=repo)
    _git("lfs", "install", "--skip-repo", env=env)  # what a user of any LFS repository runs once
    clone = tmp_path / "clone"
    _git("clone", "-q", url, str(clone), env={**env, "GIT_LFS_SKIP_SMUDGE": "1"})
    _git("checkout", "-q", "step4", env={**env, "GIT_LFS_SKIP_SMUDGE": "1"}, cwd=clone)

    pointer = _git("cat-file", "-p", "origin/step4:model.safetensors", env=env, cwd=clone)
    assert pointer.startswith("version https://git-lfs.github.com/spec/v1\n")  # git holds the pointer only
    fields = dict(line.split(" ", 1) for line in pointer.strip().splitlines())
    oid, size = fields["oid"].removeprefix("sha256:"), int(fields["size"])
    weights = clone / "model.safetensors"
    assert weights.read_text() == pointer  # not smudged yet
    _git("lfs", "pull", env=env, cwd=clone)
    assert weights.stat().st_size == size and hashlib.sha256(weights.read_bytes()).hexdigest() == oid
    with safe_open(str(weights), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}

    # transformers ignores revision= for a local directory (it reads whatever is checked out): load the
    # checked-out step4, and show that asking for another revision changes nothing.
    model = GPTNeoXForCausalLM.from_pretrained(clone, dtype=torch.float32).eval()
    other = GPTNeoXForCausalLM.from_pretrained(clone, revision="step0", dtype=torch.float32)
    assert torch.equal(other.gpt_neox.embed_in.weight, model.gpt_neox.embed_in.weight)
    assert GPTNeoXForCausalLM.from_pretrained(clone, dtype="auto").dtype == torch.float16  # config's dtype
    with torch.no_grad():
        logits = model(TOKENS).logits
    snapshot = str(run / "snapshots" / "step4")
    rounded, exact = our_logits(snapshot, TOKENS, torch.float16), our_logits(snapshot, TOKENS)
    assert logits.shape == rounded.shape
    rounded_gap, exact_gap = (logits - rounded).abs().max().item(), (logits - exact).abs().max().item()
    assert rounded_gap < 2e-5, rounded_gap  # the same fp16 weights: fp32 forward rounding only
    assert exact_gap > 10 * rounded_gap, (exact_gap, rounded_gap)  # the fp16 rounding is visible: the check can fail

    from launcher.convert import main as convert_main

    assert convert_main(["to-hf", str(run), str(repo), "--all", "--git", "--dtype", "float16"]) == 0  # nothing new
    assert _git("rev-parse", "main", env=env, cwd=repo).strip() == branches["main"]
    assert convert_main(["to-hf", str(run), str(repo), "--all", "--git"]) == 2  # float32 onto float16 branches
    (repo / "README.md").write_text("# model card\n")  # main gets a commit of its own: never dropped
    _git("add", "README.md", env=env, cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "card", env=env, cwd=repo)
    card = _git("rev-parse", "main", env=env, cwd=repo)
    assert convert_main(["to-hf", str(run), str(repo), "--all", "--git", "--dtype", "float16"]) == 0
    assert _git("rev-parse", "main", env=env, cwd=repo) == card
    for dtype, stored in (("bfloat16", "BF16"), ("float32", "F32")):  # a single export takes --dtype too
        out = tmp_path / f"export-{dtype}"
        assert convert_main(["to-hf", snapshot, str(out), "--dtype", dtype]) == 0
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {stored}


def test_git_export_errors_are_one_line(tmp_path, capsys):
    from launcher.convert import main as convert_main

    (tmp_path / "run" / "snapshots" / "step0").mkdir(parents=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert convert_main(["to-hf", str(tmp_path / "run"), str(tmp_path / "taken"), "--all", "--git"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a git repository" in err, err
    (tmp_path / "run" / "snapshots" / "step0").rmdir()
    assert convert_main(["to-hf", str(tmp_path / "run"), str(tmp_path / "repo"), "--git"]) == 2
    assert "add --all" in capsys.readouterr().err
    assert convert_main(["to-hf", str(tmp_path / "run"), str(tmp_path / "repo"), "--all", "--git"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no snapshots" in err
