"""Weights-only snapshots for studying training dynamics (Pythia's step0, step1, ..., step143000), beside the
resume checkpoints of checkpoint/io.py.

Layout under `<output_dir>/snapshots/`:
    step<N>/    mp_rank_XX_model_states.pt, one per TP rank: {"module": that TP rank's fp32 weights, full over
                ZeRO partitions} + the client state (step, consumed_samples, config, l2e) + format; manifest.json

A snapshot is small (no optimizer state: 4 bytes per parameter) and never pruned; resume checkpoints
(`checkpoints/global_step<N>`, weights + AdamW state) are pruned by keep_last_n and are the only thing a resume
reads. The files use DeepSpeed's stage-0 layout, like an `l2e-convert from-hf` import, so everything that reads
a checkpoint reads a snapshot with the existing TP merge rules (ds_files.DeepSpeedCheckpoint): `l2e-convert
to-hf`, `train.init_from`, `l2e-analyze`, `l2e-neuromfa`.

Writing is atomic and verified like a checkpoint: every TP rank's DP-rank-0 process writes its file into
`.tmp-step<N>/` and hashes it, rank 0 writes the manifest (sizes, sha256) and renames the directory into place.
When a resumed run re-runs steps a killed attempt had already snapshotted, the intact snapshots are kept (a
same-layout resume is bit-exact: they hold the same weights); a run that did not resume replaces what it finds. The trainer writes a step's snapshot before that
step's resume checkpoint, so a resume never starts past a snapshot that is missing.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from l2e_dist.checkpoint.convert import export_hf, exported_dtype, is_hf_directory
from l2e_dist.checkpoint.manifest import CheckpointError, file_sha256, verify_checkpoint, write_manifest
from l2e_dist.console import log_event
from l2e_dist.fileio import fsync_path
from l2e_dist.parallel.launcher_watch import exit_if_launcher_gone

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_FORMAT = "l2e-dist-snapshot/1"
_STEP_DIR = re.compile(r"^step(\d+)$")
_EXPORT_TMP = re.compile(r"^\.step\d+\.tmp-(\d+)$")  # convert._atomic_directory's temporary directories


def snapshot_root(path: str | Path) -> Path:
    """Where the step<N> directories of `path` are: a run's output_dir (its snapshots/), a snapshots/
    directory, or any directory of step<N> directories such as an `l2e-convert to-hf --all` output."""
    path = Path(path)
    return path / SNAPSHOT_DIR if (path / SNAPSHOT_DIR).is_dir() else path


def list_snapshots(path: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step<N> directory under `path` (see snapshot_root), by step; [] if none."""
    root = snapshot_root(path)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def is_model_directory(path: str | Path) -> bool:
    """An HF directory or one checkpoint/snapshot directory (as opposed to a run of several)."""
    path = Path(path)
    return (path / "config.json").is_file() or any(path.glob("*_model_states.pt"))


def run_snapshots(path: str | Path) -> list[tuple[int, Path]]:
    """The snapshots `path` stands for when it is a run directory (see snapshot_root); [] when it is a
    single model directory or holds no snapshots."""
    path = Path(path)
    if not path.is_dir() or is_model_directory(path):
        return []
    return list_snapshots(path)


# ------------------------------------------------------------------------------------------- writing
def full_fp32_weights(engine, keep: bool) -> dict[str, torch.Tensor]:
    """This TP rank's fp32 master weights, each gathered over its ZeRO partitions (collective over the DP
    group: every rank calls it, parameters in the same order). Returned only where `keep`, else {}."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1-3 and bf16: gathered master weights
        if full is None:  # stage 0 fp32: the parameter is the master copy
            full = param.detach()
        if keep:
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are placeholders
            weights[name] = full.detach().reshape(shape).to(device="cpu", dtype=torch.float32, copy=True)
    return weights


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_snapshot(engine, snapshot_dir: Path, step: int, client_state: dict, keep_existing: bool) -> Path:
    """Collective: every rank calls it. Writes `snapshot_dir/step<step>`, replacing an existing one unless
    `keep_existing` (the run resumed: snapshots past its checkpoint are a killed attempt's) and it is intact."""
    from megatron.core import parallel_state

    rank = dist.get_rank()
    final, tmp = snapshot_dir / f"step{step}", snapshot_dir / f".tmp-step{step}"
    intact = None
    if rank == 0:
        intact = keep_existing and final.is_dir() and verify_checkpoint(final) is None
    if _broadcast(intact):
        log_event(f"snapshot {final} already exists (intact); kept")
        return final
    writer = parallel_state.get_data_parallel_rank() == 0  # one writer per TP rank
    weights = full_fp32_weights(engine, keep=writer)
    if rank == 0:
        snapshot_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        tmp.mkdir()
    dist.barrier()
    digests = {}
    if writer:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        name = f"mp_rank_{tp_rank:02d}_model_states.pt"
        state = {
            "module": weights,
            "mp_world_size": parallel_state.get_tensor_model_parallel_world_size(),
            "dp_world_size": 1,
            **client_state,
            "format": SNAPSHOT_FORMAT,
        }
        torch.save(state, tmp / name)
        digests[name] = file_sha256(tmp / name)
    shares: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, digests)
    if rank == 0:
        write_manifest(tmp, {rel: digest for share in shares for rel, digest in (share or {}).items()})
        exit_if_launcher_gone()  # a rank whose launcher died publishes nothing
        if final.exists():  # an earlier run's, or damaged. Safe to delete first: a crash before the rename
            shutil.rmtree(final)  # leaves no checkpoint of this step, so a resume re-runs it and rewrites this
        os.replace(tmp, final)
        fsync_path(snapshot_dir)
    dist.barrier()
    return final


# ------------------------------------------------------------------------------------------- export
def _remove_dead_exports(out_dir: Path) -> None:
    """Temporary directories of exports whose process is gone (killed): they would only take disk space."""
    for path in out_dir.iterdir():
        match = _EXPORT_TMP.match(path.name)
        if match and path.is_dir():
            try:
                os.kill(int(match[1]), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass


def export_snapshots_hf(run_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
                        log=print, dtype: str = "float32") -> tuple[list[Path], list[Path]]:
    """Every snapshot of `run_dir` as an HF model directory `out_dir/step<N>` (Pythia's revision names).

    Returns (written, skipped). A step whose directory is already a complete export is skipped: each export is
    written into a temporary directory and renamed into place, so a killed export never leaves a partial
    step<N>. A snapshot failing verification (sizes, sha256, safe loading) is not exported; the others are,
    then CheckpointError names the damaged ones and what is wrong with them."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(f"{run_dir} has no snapshots ({SNAPSHOT_DIR}/step<N>): train with "
                              "train.save_schedule=pythia or train.extra_save_steps, or export one checkpoint "
                              "without --all")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_dead_exports(out_dir)
    written, skipped, damaged = [], [], []
    for step, snapshot in snapshots:
        target = out_dir / f"step{step}"
        if is_hf_directory(target):
            if (found := exported_dtype(target)) != dtype:
                raise CheckpointError(f"{target} was exported as {found}, not {dtype}: export into another "
                                      f"directory or pass --dtype {found}")
            skipped.append(target)
            continue
        problem = verify_checkpoint(snapshot, deep=True)
        if problem is not None:
            damaged.append(problem)
            continue
        written.append(export_hf(snapshot, target, max_shard_bytes=max_shard_bytes, dtype=dtype))
        log(f"l2e-convert: wrote {target}")
    if damaged:
        raise CheckpointError(f"{len(damaged)} damaged snapshot(s) not exported ({'; '.join(damaged)}); the other "
                              f"{len(written) + len(skipped)} are in {out_dir}: restore them from a backup or "
                              "delete them")
    return written, skipped
