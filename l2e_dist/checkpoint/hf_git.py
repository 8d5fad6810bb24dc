"""A run's snapshots as ONE git repository laid out like Pythia's hub repositories: a `step<N>` branch per
snapshot, `main` at the last step, weights stored through git-lfs (ready for `git push`).

    export_snapshots_git("runs/pythia-160m", "hf/pythia-160m", dtype="float16")
    git -C hf/pythia-160m push https://huggingface.co/ORG/NAME --all   # every branch, LFS objects included

Each step is exported by `export_hf` into a scratch directory and committed with git plumbing (a private index,
`--work-tree` the scratch directory, `commit-tree`, `update-ref`), so the repository's own work tree is only
touched once at the end (checked out at `main`). History is linear in step order: a step's commit has the
closest earlier step's commit as parent, so `git log main` walks the training run. `*.safetensors` and `*.bin`
go through the LFS filter (the hub's .gitattributes patterns): git stores pointers, `.git/lfs/objects` the
contents. Steps that already have a branch are kept; running again after more snapshots adds the new ones.

git runs as a subprocess with a fixed author identity, so no git configuration is needed; the LFS filter is
installed into the repository's own config (`git lfs install --local`), never the user's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from l2e_dist.checkpoint.convert import export_hf
from l2e_dist.checkpoint.manifest import CheckpointError, verify_checkpoint
from l2e_dist.checkpoint.snapshots import SNAPSHOT_DIR, list_snapshots

GIT_IDENTITY = ("-c", "user.name=l2e-dist", "-c", "user.email=l2e-dist@users.noreply.localhost")
LFS_PATTERNS = ("*.safetensors", "*.bin")  # what the hub's default .gitattributes sends to LFS among our files
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
BRANCH_PREFIX = "step"


class GitExportError(CheckpointError):
    """A git repository export that cannot proceed (tool missing, directory not ours, git failed)."""


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, work_tree: Path | None = None) -> str:
    """Run `git` on `repo` (its .git) with our identity; stdout stripped. A failure is one GitExportError line."""
    command = ["git", *GIT_IDENTITY, "--git-dir", str(repo / ".git")]
    command += ["--work-tree", str(work_tree if work_tree is not None else repo)]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise GitExportError(f"`git {' '.join(args)}` failed in {repo}: {detail}")
    return proc.stdout.strip()


def require_git_lfs() -> None:
    if shutil.which("git") is None:
        raise GitExportError("git is not installed: install it (apt-get install -y git) or export plain folders "
                             "without --git")
    proc = subprocess.run(["git", "lfs", "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GitExportError("git-lfs is not installed: install it (apt-get install -y git-lfs) or export plain "
                             "folders without --git")


def _open_repository(repo: Path) -> None:
    """Create the repository (branch main, local LFS filter) or check that an existing one can take steps."""
    if (repo / ".git").is_dir():
        if _git(repo, "status", "--porcelain"):
            raise GitExportError(f"{repo} has uncommitted changes: commit or discard them (git -C {repo} status)")
        _git(repo, "lfs", "install", "--local")
        return
    if repo.exists() and any(repo.iterdir()):
        raise GitExportError(f"{repo} exists and is not a git repository: give a new or empty directory, or an "
                             "earlier --git export")
    repo.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "--initial-branch", "main", str(repo)], check=True, capture_output=True)
    _git(repo, "lfs", "install", "--local")


def step_branches(repo: Path) -> dict[int, str]:
    """{step: commit} of the repository's step<N> branches."""
    out = _git(repo, "for-each-ref", "--format=%(refname:short) %(objectname)", f"refs/heads/{BRANCH_PREFIX}*")
    found = {}
    for line in out.splitlines():
        name, commit = line.split()
        if name[len(BRANCH_PREFIX):].isdigit():
            found[int(name[len(BRANCH_PREFIX):])] = commit
    return found


def _commit_tree(repo: Path, tree_dir: Path, message: str, parent: str | None) -> str:
    """Commit exactly the files of `tree_dir` (through the LFS filter) without touching the repo's work tree."""
    index = repo / ".git" / f"index.l2e-export-{os.getpid()}"
    env = {"GIT_INDEX_FILE": str(index)}
    try:
        _git(repo, "add", "-A", ".", env=env, work_tree=tree_dir)
        tree = _git(repo, "write-tree", env=env, work_tree=tree_dir)
    finally:
        index.unlink(missing_ok=True)
    return _git(repo, "commit-tree", tree, *(("-p", parent) if parent else ()), "-m", message)


def _point_main(repo: Path, last: str, step_commits: set[str], last_branch: str, log) -> None:
    """main = the last step, the work tree checked out there. A main with commits of its own (a model card
    added by hand) is left as it is: moving it would drop them."""
    current = _git(repo, "for-each-ref", "--format=%(objectname)", "refs/heads/main")
    if current and current not in step_commits:
        log(f"l2e-convert: main of {repo} has commits of its own; left as it is (point it at the last step "
            f"with: git -C {repo} branch -f main {last_branch})")
        return
    _git(repo, "update-ref", "refs/heads/main", last)
    _git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
    _git(repo, "reset", "-q", "--hard")  # the work tree shows main (the last step), LFS files smudged


def export_snapshots_git(run_dir: str | Path, repo_dir: str | Path, dtype: str = "float32",
                         max_shard_bytes: int = 5 * 2**30, log=print) -> tuple[list[int], list[int]]:
    """Every snapshot of `run_dir` as branch step<N> of the git repository `repo_dir`; `main` = the last step.
    Returns (steps committed, steps whose branch already existed). Damaged snapshots are not committed; the
    others are, then CheckpointError names the damaged ones."""
    require_git_lfs()
    run_dir, repo = Path(run_dir), Path(repo_dir).resolve()
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(f"{run_dir} has no snapshots ({SNAPSHOT_DIR}/step<N>): train with "
                              "train.save_schedule=pythia or train.extra_save_steps")
    _open_repository(repo)
    commits = step_branches(repo)
    written, skipped, damaged = [], [], []
    for step, snapshot in snapshots:
        if step in commits:
            found = json.loads(_git(repo, "show", f"{commits[step]}:config.json")).get("torch_dtype", "float32")
            if found != dtype:
                raise GitExportError(f"branch {BRANCH_PREFIX}{step} of {repo} holds {found} weights, not {dtype}: "
                                     f"pass --dtype {found} or export into another directory")
            skipped.append(step)
            continue
        if (problem := verify_checkpoint(snapshot, deep=True)) is not None:
            damaged.append(problem)
            continue
        scratch = repo.parent / f".{repo.name}.{BRANCH_PREFIX}{step}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            export_hf(snapshot, scratch, max_shard_bytes=max_shard_bytes, dtype=dtype)
            (scratch / ".gitattributes").write_text(GITATTRIBUTES)
            parent = commits[max(earlier)] if (earlier := [s for s in commits if s < step]) else None
            commit = _commit_tree(repo, scratch, f"step {step} of {run_dir.resolve().name} ({dtype})", parent)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _git(repo, "update-ref", f"refs/heads/{BRANCH_PREFIX}{step}", commit)
        commits[step] = commit
        written.append(step)
        log(f"l2e-convert: committed branch {BRANCH_PREFIX}{step} of {repo}")
    if commits:
        _point_main(repo, commits[max(commits)], set(commits.values()), f"{BRANCH_PREFIX}{max(commits)}", log)
    if damaged:
        raise CheckpointError(f"{len(damaged)} damaged snapshot(s) not committed ({'; '.join(damaged)}); the other "
                              f"{len(written) + len(skipped)} are branches of {repo}: restore them from a backup "
                              "or delete them")
    return written, skipped
