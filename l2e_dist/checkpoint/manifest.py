"""What makes a checkpoint directory trustworthy, and which one to resume from: the manifest (every file's size and
sha256), verification (sizes, hashes, a weights_only load of every .pt file), and the choice among
`global_step<N>/` directories (`latest` first, then newest first, skipping damaged ones, each logged).

The lowest layer of the checkpoint package: save/resume (io), resharding, snapshots and HF conversion build on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist

from l2e_dist.checkpoint.ds_files import CheckpointFormatError, safe_load
from l2e_dist.checkpoint.rank_files import RankPosition, files_of_rank, relative_files
from l2e_dist.console import log_event
from l2e_dist.errors import UserError
from l2e_dist.fileio import atomic_write_text, fsync_path

TAG = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or one that cannot continue this run; the message says what to change."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST]


def write_manifest(ckpt: Path, sha256: dict[str, str] | None = None, synced: bool = False) -> None:
    """Record every file's size and sha256 so that a missing, truncated or corrupted shard is detected on load.
    `sha256` (relative path -> digest) when already computed; `synced` when every file was already fsynced
    by its writer (else it is fsynced here)."""
    files, digests = {}, {}
    for path in _checkpoint_files(ckpt):
        rel = str(path.relative_to(ckpt))
        if not synced:
            fsync_path(path)
        files[rel] = path.stat().st_size
        digests[rel] = sha256[rel] if sha256 and rel in sha256 else file_sha256(path)
    atomic_write_text(ckpt / MANIFEST, json.dumps({"files": files, "sha256": digests}, indent=1))


def sync_and_hash_own_files(ckpt: Path) -> dict[str, str]:
    """Collective: every rank fsyncs and hashes the files it wrote (on its own node, while they are in its page
    cache); returns every file's sha256 on every rank."""
    mine = {}
    for rel in files_of_rank(relative_files(ckpt, skip=(MANIFEST,)), RankPosition.current(), reading=False):
        fsync_path(ckpt / rel)
        mine[rel] = file_sha256(ckpt / rel)
    shares: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {rel: digest for share in shares for rel, digest in (share or {}).items()}


def read_manifest(ckpt: Path) -> tuple[dict[str, int], dict[str, str]] | str:
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (incomplete checkpoint)"
    try:
        record = json.loads(manifest.read_text())
        return dict(record["files"]), dict(record.get("sha256", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{manifest} is unreadable: {exc}"


def verify_file(ckpt: Path, rel: str, size: int, digest: str | None, deep: bool) -> str | None:
    """None when file `rel` has its recorded size (and, `deep`, its sha256, and as a .pt file loads with
    weights_only=True), else what is wrong. The hash streams the file once into the page cache; the
    memory-mapped weights_only load right after reads only its pickle, from that cache."""
    path = ckpt / rel
    if not path.is_file():
        return f"{path} is missing"
    if path.stat().st_size != size:
        return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    if not deep:
        return None
    if digest is not None and file_sha256(path) != digest:
        return f"{path} does not match its sha256 in {MANIFEST} (corrupt: changed after it was saved)"
    if rel.endswith(".pt"):
        try:
            safe_load(path)
        except CheckpointFormatError as exc:
            return str(exc)
    return None


def verify_checkpoint(ckpt: Path, deep: bool = False, only: list[str] | None = None) -> str | None:
    """None when every file in the manifest exists with its recorded size (and, `deep`, its recorded sha256,
    and every .pt file loads with weights_only=True), else what is wrong. `only`: deep-check just these files
    (relative paths; the others' presence and size still)."""
    record = read_manifest(ckpt)
    if isinstance(record, str):
        return record
    files, digests = record
    for rel, size in files.items():
        problem = verify_file(ckpt, rel, size, digests.get(rel), deep and (only is None or rel in only))
        if problem is not None:
            return problem
    return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = TAG.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _resume_candidates(ckpt_dir: Path) -> tuple[list[Path], Path | None]:
    """Checkpoints to try, best first (the one `latest` names, then newest first), and that preferred one."""
    latest_file = ckpt_dir / "latest"
    preferred = None
    if latest_file.is_file():
        name = latest_file.read_text(errors="replace").strip()
        preferred = ckpt_dir / name if TAG.match(name) else None
        if preferred is None:
            log_event(f"{latest_file} is corrupt ({name[:40]!r}); looking for the newest intact checkpoint")
    order = ([preferred] if preferred is not None else []) + [
        p for _, p in reversed(list_checkpoints(ckpt_dir)) if p != preferred
    ]
    return order, preferred


def _no_intact_checkpoint(ckpt_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"no intact checkpoint in {ckpt_dir}: every candidate failed verification (see the skipped checkpoints above); "
        "delete the directory or set train.resume=false to start over"
    )


def _log_fallback(preferred: Path | None, chosen: Path) -> None:
    if preferred is not None and chosen != preferred:
        log_event(f"checkpoint {preferred.name} is unusable; falling back to {chosen.name}")


def find_resume_checkpoint(ckpt_dir: Path, deep: bool = False) -> Path | None:
    """The checkpoint to resume from (this process checks every file): the one `latest` names if it verifies,
    else the newest one that does (logged). None when there is no checkpoint at all; raises if
    checkpoints exist but none is intact. Distributed runs use `select_resume_checkpoint`."""
    order, preferred = _resume_candidates(ckpt_dir)
    for path in order:
        problem = verify_checkpoint(path, deep) if path.is_dir() else f"{path} does not exist"
        if problem is None:
            _log_fallback(preferred, path)
            return path
        log_event(f"skipping checkpoint {path.name}: {problem}")
    if order or (ckpt_dir / "latest").exists():
        raise _no_intact_checkpoint(ckpt_dir)
    return None


def select_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """Collective `find_resume_checkpoint(deep=True)`: rank 0 orders the candidates and checks sizes; then
    every rank deep-verifies (sha256 + weights_only load) the files IT will read, all ranks in parallel, and
    a candidate is taken only when every rank found its files intact. Same answer on every rank."""
    rank = dist.get_rank()
    shallow = None
    if rank == 0:
        order, preferred = _resume_candidates(ckpt_dir)
        shallow = (
            [(str(p), verify_checkpoint(p) if p.is_dir() else f"{p} does not exist") for p in order],
            str(preferred) if preferred else None,
            bool(order) or (ckpt_dir / "latest").exists(),
        )
    candidates, preferred, any_found = from_rank0(shallow)
    me = RankPosition.current()
    for path_text, problem in candidates:
        path = Path(path_text)
        if problem is None:
            record = read_manifest(path)
            if isinstance(record, str):
                problem = record
            else:
                mine = files_of_rank(list(record[0]), me, reading=True)
                problem = verify_checkpoint(path, deep=True, only=mine)
            problems: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(problems, problem)
            problem = next((p for p in problems if p is not None), None)
        if problem is None:
            if rank == 0:
                _log_fallback(Path(preferred) if preferred else None, path)
            return path
        if rank == 0:
            log_event(f"skipping checkpoint {path.name}: {problem}")
    if any_found:
        error = _no_intact_checkpoint(ckpt_dir)
        error.agreed = True
        raise error
    return None


def from_rank0(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
