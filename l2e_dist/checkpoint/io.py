"""Atomic, verified training checkpoints on top of DeepSpeed's (ZeRO-sharded) checkpoint files.

Layout under `<output_dir>/checkpoints/`:
    global_step<N>/          DeepSpeed files + rank_state_<r>.pt (RNG) + manifest.json (file sizes)
    latest                   text file naming the newest complete tag, written last

A checkpoint is written into `.tmp-global_step<N>/`, verified complete on every rank, renamed, and only then
`latest` is replaced: a crash at any point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This rank's RNG states as plain lists/tensors, so they load with torch.load(weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_manifest(ckpt: Path) -> None:
    files = {
        str(p.relative_to(ckpt)): p.stat().st_size
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    _atomic_write_text(ckpt / "manifest.json", json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when every file in the manifest exists with its recorded size, else what is wrong."""
    manifest = ckpt / "manifest.json"
    if not manifest.is_file():
        return f"{manifest} is missing (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _TAG.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it verifies, else the newest one that does
    (with a warning). Raises if checkpoints exist but none is intact."""
    candidates = list_checkpoints(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    preferred = None
    if latest_file.is_file():
        name = latest_file.read_text().strip()
        preferred = ckpt_dir / name if _TAG.match(name) else None
        if preferred is None:
            warnings.warn(
                f"{latest_file} is corrupt ({name[:40]!r}); looking for the newest intact checkpoint",
                stacklevel=2,
            )
    order = ([preferred] if preferred is not None else []) + [
        p for _, p in reversed(candidates) if p != preferred
    ]
    for path in order:
        problem = verify_checkpoint(path) if path.is_dir() else f"{path} does not exist"
        if problem is None:
            if preferred is not None and path != preferred:
                warnings.warn(
                    f"checkpoint {preferred.name} is unusable; falling back to {path.name}", stacklevel=2
                )
            return path
        warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    if candidates or latest_file.exists():
        raise CheckpointError(
            f"no intact checkpoint in {ckpt_dir}: every candidate failed verification (see warnings above); "
            "delete the directory or set train.resume=false to start over"
        )
    return None


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last_n: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    rank = dist.get_rank()
    tag = f"global_step{step}"
    tmp, final = ckpt_dir / f".tmp-{tag}", ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp / f"rank_state_{rank}.pt")
    dist.barrier()
    if rank == 0:
        _write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last_n > 0:
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, ckpt: Path) -> dict:
    """Load model/optimizer/scheduler into the DeepSpeed engine; restore this rank's RNG; return client state."""
    path, client_state = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    rank_file = ckpt / f"rank_state_{dist.get_rank()}.pt"
    if rank_file.is_file():
        set_rng_state(torch.load(rank_file, weights_only=True))
    return client_state or {}
