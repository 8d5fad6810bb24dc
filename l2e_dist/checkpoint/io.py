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

Resume (`resume`): the newest checkpoint that verifies (every manifest file present with its size and sha256,
every .pt file loadable with torch.load(weights_only=True)), falling back to older ones (a logged event). Each
rank deep-verifies, in parallel, the files it will read (rank_files); each writer fsyncs and hashes the files it
wrote at save time, so no rank reads the whole checkpoint and the fsyncs reach every node's disk. A save that
cannot fit on a disk is refused on every rank before anything is written. Same
layout (TP, DP, ZeRO stage, precision, padded vocab): DeepSpeed's native load, bit-exact, RNG states restored.
Another layout: l2e_dist.checkpoint.reshard, RNG re-seeded from (seed, step, rank).

Unpickling: DeepSpeed's own loader calls torch.load(weights_only=False) on every file (deepspeed 0.19.8,
TorchCheckpointEngine.load), i.e. it would run code embedded in a crafted file. We therefore load every .pt file
of the chosen checkpoint with weights_only=True first (ds_files.safe_load; DeepSpeed's four record types are
allowlisted as inert stand-ins) and refuse the checkpoint if any file needs another global; only then does
DeepSpeed's loader see the files, and the pickle opcodes it executes are the ones already validated.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from l2e_dist.checkpoint.compat import IMPORT_FORMAT
from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
from l2e_dist.checkpoint.identity import RUN_CONFIG_FILE, check_same_experiment
from l2e_dist.checkpoint.manifest import (
    CheckpointError,
    list_checkpoints,
    select_resume_checkpoint,
    sync_and_hash_own_files,
    write_manifest,
)
from l2e_dist.checkpoint.reshard import load_resharded
from l2e_dist.console import log_event
from l2e_dist.data.data_seed import check_resume_data_seed
from l2e_dist.errors import environment_error_message
from l2e_dist.fileio import atomic_write_text, fsync_path
from l2e_dist.parallel.launcher_watch import exit_if_launcher_gone


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


def _optimizer_param_names(engine) -> list[list[str]] | None:
    """Names of the optimizer's parameters, group by group, when it holds module parameters (stage 0)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = getattr(engine.optimizer, "param_groups", None) or []
    if not groups or any(id(p) not in names for g in groups for p in g["params"]):
        return None
    return [[names[id(p)] for p in g["params"]] for g in groups]


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last_n: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. Refuses (CheckpointError, on every
    rank, before writing) when a disk lacks the space, and turns a failed write into a CheckpointError; either
    way the previous checkpoints and `latest` are untouched."""
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
    _check_free_space(engine, ckpt_dir, tag)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tmp / f"rank_state_{rank}.pt")
    except (OSError, RuntimeError) as exc:
        reason = environment_error_message(exc) or _disk_full_reason(ckpt_dir, exc)
        if reason is None:
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {tag} to {ckpt_dir}: {reason}; the previous checkpoints are intact"
        ) from exc
    dist.barrier()
    sha256 = sync_and_hash_own_files(tmp)
    if rank == 0:
        write_manifest(tmp, sha256, synced=True)
        exit_if_launcher_gone()  # a rank whose launcher died publishes nothing: the save stays in tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
        atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last_n > 0:
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def state_bytes(roots: list[Any]) -> int:
    """Bytes of the distinct tensor storages reachable from `roots` through lists, tuples and dicts."""
    seen: set[tuple[str, int]] = set()
    total = 0
    stack: list[tuple[Any, int]] = [(root, 0) for root in roots]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen and storage.nbytes():
                seen.add(key)
                total += storage.nbytes()
        elif depth < 6 and isinstance(obj, (list, tuple)):
            stack.extend((item, depth + 1) for item in obj)
        elif depth < 6 and isinstance(obj, dict):
            stack.extend((item, depth + 1) for item in obj.values())
    return total


def _bytes_to_write(engine) -> int:
    """About how many bytes this rank's share of a checkpoint takes: its optimizer state (ZeRO: its partition
    of the fp32 master weights and moments) plus, on the ranks that write it, the module's state."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    roots: list[Any] = [list(inner.state.values())]
    if inner is not engine.optimizer:
        roots.append([p for group in inner.param_groups for p in group["params"]])
    if getattr(engine, "save_non_zero_checkpoint", True):
        roots.append(engine.module.state_dict())
    return state_bytes(roots)


def _check_free_space(engine, ckpt_dir: Path, tag: str) -> None:
    """Collective: refuse, on every rank, a save that cannot fit on some rank's disk (ranks sharing a host and
    a file system add up), so that no rank starts writing a checkpoint that would fill the disk."""
    usage = shutil.disk_usage(ckpt_dir)
    mine = (socket.gethostname(), os.stat(ckpt_dir).st_dev, _bytes_to_write(engine), usage.free)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    need: dict[tuple[str, int], int] = {}
    free: dict[tuple[str, int], int] = {}
    for host, device, nbytes, available in everyone:
        need[(host, device)] = need.get((host, device), 0) + nbytes
        free[(host, device)] = available
    for (host, device), nbytes in sorted(need.items()):
        wanted = int(nbytes * 1.02) + 16 * 2**20  # headroom: pickle framing, json, the manifest
        if wanted > free[(host, device)]:
            error = CheckpointError(
                f"not enough disk space for checkpoint {tag} in {ckpt_dir} on {host}: it needs about "
                f"{wanted / 2**30:.2f} GiB, {free[(host, device)] / 2**30:.2f} GiB are free; free space, lower "
                "train.keep_last_n or set train.output_dir elsewhere (the previous checkpoints are intact)"
            )
            error.agreed = True
            raise error


def _disk_full_reason(ckpt_dir: Path, exc: BaseException) -> str | None:
    """torch.save reports a failed write as a RuntimeError without errno: call it a full disk when it is."""
    try:
        full = shutil.disk_usage(ckpt_dir).free < 2**20
    except OSError:
        return None
    return f"the disk is full ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})" if full else None


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


def check_resumable(saved: dict, cfg, where: str = "the checkpoint") -> None:
    """Refuse, in one line, a resume that would continue another experiment: any key that defines it (model,
    data, L2E, optimizer and schedule, precision, seed, global batch, sequence length) differs from the saved
    run's config (l2e_dist.checkpoint.identity); layout keys may change."""
    check_same_experiment(saved, cfg, where)


def resume(engine, cfg, ckpt_dir: Path, inhibitor=None) -> int:
    """Restore the newest intact checkpoint under `ckpt_dir` into `engine` (and the L2E inhibitor), on the
    same layout or another one. Returns the step it was saved at, 0 when there is nothing to resume."""
    rank = dist.get_rank()
    ckpt = select_resume_checkpoint(ckpt_dir)
    if ckpt is None:
        return 0
    source = DeepSpeedCheckpoint(ckpt)
    saved = source.client_state
    if saved.get("format") == IMPORT_FORMAT:
        raise CheckpointError(f"{ckpt} holds weights only (no optimizer state): start from it with "
                              "train.init_from in a fresh train.output_dir instead of resuming")
    if not (ckpt_dir.parent / RUN_CONFIG_FILE).is_file():  # else the trainer held the launch to config.yaml
        check_resumable(saved.get("config") or {}, cfg, str(ckpt))
    check_resume_data_seed(ckpt, saved, cfg.data.data_seed)
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
    how = "same layout" if before == now else f"resharded from {_describe(before)} to {_describe(now)}"
    log_event(f"resumed from {ckpt} (step {step}, {how})")
    return step


def _describe(layout: dict[str, Any]) -> str:
    return (f"TP={layout['tensor_parallel']} DP={layout['data_parallel']} ZeRO-{layout['zero_stage']} "
            f"{layout['precision']} vocab={layout['padded_vocab_size']}")
