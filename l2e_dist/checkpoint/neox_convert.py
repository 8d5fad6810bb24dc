"""`l2e-convert from-neox`: a gpt-neox `global_stepN/` directory -> our checkpoint at a TP size, with the
optimizer state, written once so that later branches (and `to-hf`, `l2e-analyze`) read our format.

The output is DeepSpeed's stage-0 layout, as `import_hf` writes it, plus the optimizer: per TP rank
mp_rank_XX_model_states.pt with `module` (fp32 master weights), `optimizer` (a torch AdamW state dict: step,
exp_avg, exp_avg_sq per parameter; its param groups carry no hyperparameters, the run's config gives them) and
client state `optimizer_param_names`, `config.model`, `step` = the gpt-neox iteration, `format` NEOX_IMPORT_FORMAT
and `neox` (iteration, lr-scheduler position num_iters, loss-scaler state, the gpt-neox args). `train.init_from`
of it continues the optimizer exactly as from the native directory.

Memory: one output TP rank's state at a time (fp32 weights + two moments = 12 bytes per parameter / tp), plus
one full-width parameter while it is merged and cut.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import torch

from l2e_dist.checkpoint.compat import resize_vocab_rows
from l2e_dist.checkpoint.convert import _atomic_directory, _publish
from l2e_dist.checkpoint.ds_files import OPTIMIZER_KINDS
from l2e_dist.checkpoint.manifest import CheckpointError, write_manifest
from l2e_dist.checkpoint.neox_native import NeoxNativeCheckpoint
from l2e_dist.model.config import ModelConfig
from l2e_dist.model.tp_layout import split_tensor

NEOX_IMPORT_FORMAT = "l2e-dist-neox-import/1"


def neox_model_config(source: NeoxNativeCheckpoint) -> ModelConfig:
    """Our ModelConfig of a gpt-neox checkpoint: its args give the sizes; the rest is Pythia's (rotary 25%, tanh
    GELU, parallel residual, 4h MLP). The vocabulary is the padded one, as in Pythia's published HF configs."""
    args = source.args
    return ModelConfig(
        num_layers=int(args["num_layers"]),
        hidden_size=int(args["hidden_size"]),
        num_attention_heads=int(args["num_attention_heads"]),
        max_position_embeddings=int(args.get("max_position_embeddings", 2048)),
        vocab_size=int(args.get("padded_vocab_size") or source.local_shape("embed_in.weight")[0] * source.tp_size),
        make_vocab_size_divisible_by=int(args.get("make_vocab_size_divisible_by", 128)),
    )


def neox_state(source: NeoxNativeCheckpoint) -> dict:
    """What a branch needs beyond the tensors (kept in a converted checkpoint's client state)."""
    return {"iteration": source.iteration, "num_iters": source.num_iters, "loss_scaler": source.loss_scaler_state(),
            "args": dict(source.args), "lr_scheduler": source.lr_scheduler}


def import_neox(src_dir: str | Path, out_dir: str | Path, tp: int) -> Path:
    """Write our TP=`tp` checkpoint (weights = fp32 masters, AdamW state, counters) of a gpt-neox directory."""
    if tp < 1:
        raise CheckpointError(f"--tp must be >= 1, got {tp}")
    source = NeoxNativeCheckpoint(src_dir)
    cfg = neox_model_config(source)
    if cfg.num_attention_heads % tp or cfg.ffn_size % tp:
        raise CheckpointError(f"--tp {tp} must divide the heads ({cfg.num_attention_heads}) and MLP width "
                              f"({cfg.ffn_size}) of {src_dir}")
    rows = cfg.padded_vocab_size(tp)
    names = source.names
    groups = [[n for n in names if _decays(n, source)], [n for n in names if not _decays(n, source)]]
    order = [n for group in groups for n in group]
    step = source.optimizer_step()
    counters = source.engine_state
    out_dir, tmp = _atomic_directory(Path(out_dir))
    try:
        for rank in range(tp):
            module, state = {}, {}
            for index, name in enumerate(order):
                values = {kind: split_tensor(name, resize_vocab_rows(name, source.full(name, kind), rows,
                                                                     cfg.vocab_size), tp, rank)
                          for kind in ("fp32", *OPTIMIZER_KINDS)}
                module[name] = values.pop("fp32")
                state[index] = {"step": step.clone(), **values}
            first = len(groups[0])
            torch.save({
                "module": module,
                "optimizer": {"state": state, "param_groups": [{"params": list(range(first))},
                                                               {"params": list(range(first, len(order)))}]},
                "optimizer_param_names": groups,
                "lr_scheduler": None,
                **{k: counters[k] for k in ("global_steps", "global_samples", "skipped_steps")},
                "mp_world_size": tp,
                "dp_world_size": 1,
                "step": source.iteration,
                "config": {"model": {f.name: getattr(cfg, f.name) for f in fields(cfg)}},
                "format": NEOX_IMPORT_FORMAT,
                "neox": neox_state(source),
            }, tmp / f"mp_rank_{rank:02d}_model_states.pt")
            del module, state
        write_manifest(tmp)
        _publish(tmp, out_dir)
    finally:
        source.release()
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _decays(name: str, source: NeoxNativeCheckpoint) -> bool:
    """Our build_optimizer's rule (matrices other than LayerNorms decay), the same split as gpt-neox's groups."""
    return len(source.local_shape(name)) >= 2 and "layernorm" not in name and "layer_norm" not in name
