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
every .pt file loadable with torch.load(weights_only=True)), falling back to older ones with a warning. Each
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

import hashlib
import json
import os
import random
import re
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from l2e_dist.errors import UserError, environment_error_message

_TAG = re.compile(r"^global_step(\d+)$")
MANIFEST = "manifest.json"


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint, or one that cannot continue this run; the message says what to change."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


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
    _atomic_write_text(ckpt / MANIFEST, json.dumps({"files": files, "sha256": digests}, indent=1))


def _sync_and_hash_own_files(ckpt: Path) -> dict[str, str]:
    """Collective: every rank fsyncs and hashes the files it wrote (on its own node, while they are in its page
    cache); returns every file's sha256 on every rank."""
    from l2e_dist.checkpoint.rank_files import RankPosition, files_of_rank, relative_files

    mine = {}
    for rel in files_of_rank(relative_files(ckpt, skip=(MANIFEST,)), RankPosition.current(), reading=False):
        fsync_path(ckpt / rel)
        mine[rel] = file_sha256(ckpt / rel)
    shares: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {rel: digest for share in shares for rel, digest in (share or {}).items()}


def _read_manifest(ckpt: Path) -> tuple[dict[str, int], dict[str, str]] | str:
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
        from l2e_dist.checkpoint.ds_files import CheckpointFormatError, safe_load

        try:
            safe_load(path)
        except CheckpointFormatError as exc:
            return str(exc)
    return None


def verify_checkpoint(ckpt: Path, deep: bool = False, only: list[str] | None = None) -> str | None:
    """None when every file in the manifest exists with its recorded size (and, `deep`, its recorded sha256,
    and every .pt file loads with weights_only=True), else what is wrong. `only`: deep-check just these files
    (relative paths; the others' presence and size still)."""
    record = _read_manifest(ckpt)
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
            m = _TAG.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _resume_candidates(ckpt_dir: Path) -> tuple[list[Path], Path | None]:
    """Checkpoints to try, best first (the one `latest` names, then newest first), and that preferred one."""
    latest_file = ckpt_dir / "latest"
    preferred = None
    if latest_file.is_file():
        name = latest_file.read_text(errors="replace").strip()
        preferred = ckpt_dir / name if _TAG.match(name) else None
        if preferred is None:
            warnings.warn(
                f"{latest_file} is corrupt ({name[:40]!r}); looking for the newest intact checkpoint",
                stacklevel=3,
            )
    order = ([preferred] if preferred is not None else []) + [
        p for _, p in reversed(list_checkpoints(ckpt_dir)) if p != preferred
    ]
    return order, preferred


def _no_intact_checkpoint(ckpt_dir: Path) -> CheckpointError:
    return CheckpointError(
        f"no intact checkpoint in {ckpt_dir}: every candidate failed verification (see warnings above); "
        "delete the directory or set train.resume=false to start over"
    )


def _fallback_warning(preferred: Path | None, chosen: Path) -> None:
    if preferred is not None and chosen != preferred:
        warnings.warn(f"checkpoint {preferred.name} is unusable; falling back to {chosen.name}", stacklevel=3)


def find_resume_checkpoint(ckpt_dir: Path, deep: bool = False) -> Path | None:
    """The checkpoint to resume from (this process checks every file): the one `latest` names if it verifies,
    else the newest one that does (with a warning). None when there is no checkpoint at all; raises if
    checkpoints exist but none is intact. Distributed runs use `select_resume_checkpoint`."""
    order, preferred = _resume_candidates(ckpt_dir)
    for path in order:
        problem = verify_checkpoint(path, deep) if path.is_dir() else f"{path} does not exist"
        if problem is None:
            _fallback_warning(preferred, path)
            return path
        warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    if order or (ckpt_dir / "latest").exists():
        raise _no_intact_checkpoint(ckpt_dir)
    return None


def select_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """Collective `find_resume_checkpoint(deep=True)`: rank 0 orders the candidates and checks sizes; then
    every rank deep-verifies (sha256 + weights_only load) the files IT will read, all ranks in parallel, and
    a candidate is taken only when every rank found its files intact. Same answer on every rank."""
    from l2e_dist.checkpoint.rank_files import RankPosition, files_of_rank

    rank = dist.get_rank()
    shallow = None
    if rank == 0:
        order, preferred = _resume_candidates(ckpt_dir)
        shallow = (
            [(str(p), verify_checkpoint(p) if p.is_dir() else f"{p} does not exist") for p in order],
            str(preferred) if preferred else None,
            bool(order) or (ckpt_dir / "latest").exists(),
        )
    candidates, preferred, any_found = _from_rank0(shallow)
    me = RankPosition.current()
    for path_text, problem in candidates:
        path = Path(path_text)
        if problem is None:
            record = _read_manifest(path)
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
                _fallback_warning(Path(preferred) if preferred else None, path)
            return path
        if rank == 0:
            warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    if any_found:
        error = _no_intact_checkpoint(ckpt_dir)
        error.agreed = True
        raise error
    return None


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
    sha256 = _sync_and_hash_own_files(tmp)
    if rank == 0:
        write_manifest(tmp, sha256, synced=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
        _atomic_write_text(ckpt_dir / "latest", tag)
        if keep_last_n > 0:
            for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _bytes_to_write(engine) -> int:
    """About how many bytes this rank's share of a checkpoint takes: its optimizer state (ZeRO: its partition
    of the fp32 master weights and moments) plus, on the ranks that write it, the module's state."""
    from l2e_dist.training.bench import state_bytes

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
    ckpt = select_resume_checkpoint(ckpt_dir)
    if ckpt is None:
        return 0
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
