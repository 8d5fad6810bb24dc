"""Atomic, verified training checkpoints on top of DeepSpeed's (ZeRO-sharded) checkpoint files, and resume.

Layout under `<output_dir>/checkpoints/`:
    global_step<N>/          DeepSpeed files + rank_state_<r>.pt (RNG) + manifest.json (file sizes, sha256)
    latest                   text file naming the newest complete tag, written last

A checkpoint is written into `.tmp-global_step<N>/`, fsynced, given a manifest, renamed, and only then `latest`
is replaced: a crash at any point leaves the previous checkpoint and pointer intact. Older checkpoints beyond
`keep_last_n` are deleted after that.

What a checkpoint holds: model weights and AdamW state (DeepSpeed's ZeRO shards), LR scheduler, engine counters,
and the client state: step, consumed_samples (the data position: the sampler is a pure function of seed and
step), the resolved run config, the L2E state (full width, identical on all ranks), the optimizer's parameter
names (stage 0 stores them by index only); plus every rank's RNG states.

Resume (`resume`): rank 0 picks the newest checkpoint that verifies (every manifest file present with its size
and sha256, every .pt file loadable with torch.load(weights_only=True)), falling back to older ones with a
warning. The checksums are computed at save time by all ranks in parallel (file i by rank i % world size). Same
layout (TP, DP, ZeRO stage, precision, padded vocab): DeepSpeed's native load, bit-exact, RNG states restored.
Another layout: l2e_dist.checkpoint.reshard, RNG re-seeded from (seed, step, rank).

Unpickling: DeepSpeed's own loader calls torch.load(weights_only=False) on every file (deepspeed 0.19.8,
TorchCheckpointEngine.load), i.e. it would run code embedded in a crafted file. We therefore load every .pt file
of the chosen checkpoint with weights_only=True first (ds_files.safe_load; DeepSpeed's four record types are
allowlisted as inert stand-ins) and refuse the checkpoint if any file needs another global; only then does
DeepSpeed's loader see the files, and the pickle opcodes it executes are the ones already validated.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot continue this run; the message says what to change."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


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


def reseed_for_resume(seed: int, step: int, rank: int) -> None:
    """RNG streams for a resume on another layout (saved per-rank streams no longer map onto the ranks)."""
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(derived)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST]


def write_manifest(ckpt: Path, sha256: dict[str, str] | None = None) -> None:
    """Record every file's size and sha256 (fsynced first) so that a missing, truncated or corrupted shard is
    detected on load. `sha256` (relative path -> digest) when already computed, e.g. by all ranks in parallel."""
    files, digests = {}, {}
    for path in _checkpoint_files(ckpt):
        rel = str(path.relative_to(ckpt))
        _fsync(path)
        files[rel] = path.stat().st_size
        digests[rel] = sha256[rel] if sha256 and rel in sha256 else file_sha256(path)
    _atomic_write_text(ckpt / MANIFEST, json.dumps({"files": files, "sha256": digests}, indent=1))


def _parallel_sha256(ckpt: Path) -> dict[str, str]:
    """Collective: every rank hashes its share of the checkpoint's files (file i on rank i % world size)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {
        str(p.relative_to(ckpt)): file_sha256(p) for i, p in enumerate(_checkpoint_files(ckpt)) if i % world == rank
    }
    shares: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(shares, mine)
    return {rel: digest for share in shares for rel, digest in (share or {}).items()}


def verify_checkpoint(ckpt: Path, deep: bool = False) -> str | None:
    """None when every file in the manifest exists with its recorded size (and, `deep`, its recorded sha256,
    and every .pt file loads with weights_only=True), else what is wrong."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (incomplete checkpoint)"
    try:
        record = json.loads(manifest.read_text())
        files, digests = record["files"], record.get("sha256", {})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{manifest} is unreadable: {exc}"
    for rel, size in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, expected {size} (truncated or corrupt)"
    if deep:
        from l2e_dist.checkpoint.ds_files import CheckpointFormatError, safe_load

        for rel in files:
            if rel in digests and file_sha256(ckpt / rel) != digests[rel]:
                return f"{ckpt / rel} does not match its sha256 in {MANIFEST} (corrupt: changed after it was saved)"
        for rel in files:
            if rel.endswith(".pt"):
                try:
                    safe_load(ckpt / rel)
                except CheckpointFormatError as exc:
                    return str(exc)
    return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _TAG.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def find_resume_checkpoint(ckpt_dir: Path, deep: bool = False) -> Path | None:
    """The checkpoint to resume from: the one `latest` names if it verifies, else the newest one that does
    (with a warning). None when there is no checkpoint at all; raises if checkpoints exist but none is intact."""
    candidates = list_checkpoints(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    preferred = None
    if latest_file.is_file():
        name = latest_file.read_text(errors="replace").strip()
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
        problem = verify_checkpoint(path, deep) if path.is_dir() else f"{path} does not exist"
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


def _optimizer_param_names(engine) -> list[list[str]] | None:
    """Names of the optimizer's parameters, group by group, when it holds module parameters (stage 0)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = getattr(engine.optimizer, "param_groups", None) or []
    if not groups or any(id(p) not in names for g in groups for p in g["params"]):
        return None
    return [[names[id(p)] for p in g["params"]] for g in groups]


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last_n: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    rank = dist.get_rank()
    tag = f"global_step{step}"
    tmp, final = ckpt_dir / f".tmp-{tag}", ckpt_dir / tag
    param_names = _optimizer_param_names(engine)
    if param_names is not None:
        client_state = {**client_state, "optimizer_param_names": param_names}
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tmp / f"rank_state_{rank}.pt")
    dist.barrier()
    sha256 = _parallel_sha256(tmp)
    if rank == 0:
        write_manifest(tmp, sha256)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
        _atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last_n > 0:
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(engine, ckpt: Path) -> dict:
    """DeepSpeed's native load (same layout only) of a checkpoint that passed verify_checkpoint(deep=True):
    model/optimizer/scheduler into the engine, this rank's RNG; returns the client state."""
    path, client_state = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    rank_file = ckpt / f"rank_state_{dist.get_rank()}.pt"
    if rank_file.is_file():
        set_rng_state(torch.load(rank_file, weights_only=True))
    return client_state or {}


# ----------------------------------------------------------------------------------------------- resume
def _from_rank0(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_layout(engine) -> dict[str, Any]:
    """What must match for DeepSpeed's native load: TP, DP, ZeRO stage, precision, padded vocab."""
    from megatron.core import parallel_state

    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {
        "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
        "data_parallel": parallel_state.get_data_parallel_world_size(),
        "zero_stage": int(engine.zero_optimization_stage()),
        "precision": precision,
        "padded_vocab_size": int(engine.module.padded_vocab_size),
    }


def checkpoint_layout(source) -> dict[str, Any]:
    """The same record for a checkpoint on disk (a ds_files.DeepSpeedCheckpoint)."""
    config = source.client_state.get("config") or {}
    return {
        "tensor_parallel": source.tp_size,
        "data_parallel": source.dp_size,
        "zero_stage": source.zero_stage,
        "precision": (config.get("deepspeed") or {}).get("precision", "fp32"),
        "padded_vocab_size": source.tp_size * int(source.local_shape("embed_in.weight")[0]),
    }


def check_resumable(saved: dict, cfg) -> None:
    """Refuse, in one line, a resume that cannot continue the saved run: another architecture or vocabulary, or
    another global batch / sequence length (the data position and LR schedule are counted in steps of those)."""
    from l2e_dist.checkpoint.convert import architecture_mismatch
    from l2e_dist.config_utils import build
    from l2e_dist.model.config import ModelConfig

    saved_model = build(ModelConfig, saved.get("model") or {}, "model")
    mismatch = architecture_mismatch(saved_model, cfg.model)
    if saved_model.vocab_size != cfg.model.vocab_size:
        mismatch = f"model.vocab_size: checkpoint {saved_model.vocab_size}, config {cfg.model.vocab_size}"
    if mismatch:
        raise CheckpointError(
            f"the checkpoint holds another model ({mismatch}): resume with the same model section, or use a new "
            "train.output_dir (with train.init_from for its weights)"
        )
    saved_train = saved.get("train") or {}
    for key in ("global_batch_size", "seq_length"):
        if key in saved_train and saved_train[key] != getattr(cfg.train, key):
            raise CheckpointError(
                f"the checkpoint was trained with train.{key}={saved_train[key]} but the config has "
                f"{getattr(cfg.train, key)}: the data position depends on it; keep it or use a new train.output_dir"
            )
    if "seed" in saved_train and saved_train["seed"] != cfg.train.seed:
        warnings.warn(f"train.seed changed from {saved_train['seed']} to {cfg.train.seed}: the data order after "
                      "resume differs from the original run's", stacklevel=3)


def resume(engine, cfg, ckpt_dir: Path, inhibitor=None) -> int:
    """Restore the newest intact checkpoint under `ckpt_dir` into `engine` (and the L2E inhibitor), on the
    same layout or another one. Returns the step it was saved at, 0 when there is nothing to resume."""
    from l2e_dist.checkpoint.convert import IMPORT_FORMAT
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
    from l2e_dist.checkpoint.reshard import load_resharded

    rank = dist.get_rank()
    choice = None
    if rank == 0:
        try:
            choice = ("ok", find_resume_checkpoint(ckpt_dir, deep=True))
        except CheckpointError as exc:
            choice = ("error", str(exc))
    status, value = _from_rank0(choice)
    if status == "error":
        raise CheckpointError(value)
    if value is None:
        return 0
    ckpt = Path(value)
    source = DeepSpeedCheckpoint(ckpt)
    saved = source.client_state
    if saved.get("format") == IMPORT_FORMAT:
        raise CheckpointError(f"{ckpt} holds weights only (no optimizer state): start from it with "
                              "train.init_from in a fresh train.output_dir instead of resuming")
    check_resumable(saved.get("config") or {}, cfg)
    before, now = checkpoint_layout(source), run_layout(engine)
    if before == now:
        client_state = load_checkpoint(engine, ckpt)
    else:
        load_resharded(engine, source, real_vocab=int(cfg.model.vocab_size))
        client_state = saved
        reseed_for_resume(cfg.train.seed, int(saved["step"]), rank)
    if inhibitor is not None and "l2e" in client_state:
        saved_train = (saved.get("config") or {}).get("train") or {}
        micro = int(saved_train.get("micro_batch_size", 0)) * int(before["data_parallel"])
        try:  # a legacy per-micro-batch L2E state means the same only without gradient accumulation
            inhibitor.load_state_dict(client_state["l2e"], writer_micro_batches_per_step=(
                int(saved_train.get("global_batch_size", -1)) // micro if micro else None))
        except ValueError as exc:
            raise CheckpointError(f"{ckpt}: {exc}") from None
    step = int(client_state["step"])
    if rank == 0:
        how = "same layout" if before == now else f"resharded from {_describe(before)} to {_describe(now)}"
        print(f"l2e-dist: resumed from {ckpt} (step {step}, {how})", flush=True)
    return step


def _describe(layout: dict[str, Any]) -> str:
    return (f"TP={layout['tensor_parallel']} DP={layout['data_parallel']} ZeRO-{layout['zero_stage']} "
            f"{layout['precision']} vocab={layout['padded_vocab_size']}")
