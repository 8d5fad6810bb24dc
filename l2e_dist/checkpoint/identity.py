"""Run identity: which config keys define the experiment, and the one-line refusal when a resume changes them.

Every key of the run config is classified here, in one table (`KEY_RULES`; tests/test_run_identity.py fails when
a config key is missing from it):

- EXPERIMENT keys define what is trained and measured: the model, the data, L2E, optimizer and schedule,
  precision and the seed. Resuming a run (its `<output_dir>/config.yaml` or its checkpoint) with another value
  is refused: the result would be neither run.
- FREE keys are layout, logging, intervals, paths and guards: TP, DP, ZeRO stage, micro-batch, activation
  checkpointing, compile, timeouts. A resume may change them (checkpoints reshard across layouts).

`train.train_iters` is FREE: training a finished run further is a common, legitimate step. The lr schedule's
length is part of the experiment, though: `optimizer.lr_decay_iters` is compared by its effective value (null
means train.train_iters), so extending a run whose schedule follows train_iters is refused with the fix (set
optimizer.lr_decay_iters to the old length; Pythia's configs set it to 143000 already).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from l2e_dist.checkpoint.manifest import CheckpointError
from l2e_dist.config import RunConfig, config_to_dict

Kind = Literal["experiment", "free"]
# <output_dir>/config.yaml: the resolved config of a run's latest launch, the identity later launches are held to.
# A deliberate change of an experiment key (e.g. the data moved: data.paths) is declared by editing it.
RUN_CONFIG_FILE = "config.yaml"
SHOWN_DIFFERENCES = 4  # named in the refusal; the rest are counted


@dataclass(frozen=True)
class Rule:
    kind: Kind
    why: str
    # The value compared for the key (default: the key's own value); gets the whole config dict.
    effective: Callable[[dict], Any] | None = None
    # The key is compared only when this holds for both runs (e.g. L2E settings of two L2E runs).
    applies: Callable[[dict], bool] | None = None


def _get(cfg: dict, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


def _l2e_on(cfg: dict) -> bool:
    return cfg["l2e"]["method"] != "none"


def _fp16(cfg: dict) -> bool:
    return cfg["deepspeed"]["precision"] == "fp16"


def _schedule_length(cfg: dict) -> int:
    return cfg["optimizer"]["lr_decay_iters"] or cfg["train"]["train_iters"]


def _ffn_size(cfg: dict) -> int:
    return cfg["model"]["intermediate_size"] or 4 * cfg["model"]["hidden_size"]


def _experiment(why: str, **kwargs: Any) -> Rule:
    return Rule("experiment", why, **kwargs)


def _free(why: str) -> Rule:
    return Rule("free", why)


MODEL = _experiment("the architecture and initialization")
DATA = _experiment("what is trained on and validated on")
L2E = _experiment("the inhibition (compared when both runs use L2E or MEmeL)", applies=_l2e_on)
OPTIMIZER = _experiment("the optimizer and learning-rate schedule")
FP16 = _experiment("fp16 loss scaling (compared when both runs are fp16)", applies=_fp16)
LAYOUT = _free("layout: a resume may reshard onto another one")
LOGGING = _free("what is logged and where")
INTERVALS = _free("when the run logs, validates or saves")
GUARD = _free("a guard or timeout, not the training itself")

KEY_RULES: dict[str, Rule] = {
    **{f"model.{key}": MODEL for key in (
        "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings", "rotary_pct",
        "rotary_base", "layernorm_eps", "gelu_approximate", "use_parallel_residual", "make_vocab_size_divisible_by",
        "init_method", "output_layer_init_method", "init_std")},
    "model.intermediate_size": _experiment("the MLP width (null = 4 x hidden_size)", effective=_ffn_size),
    "model.loss_chunk_tokens": _free("compute only: how the LM head's loss is chunked"),
    "model.cross_entropy": _free("compute only: how each chunk's softmax and gradient are computed"),
    "model.attention_backend": _free("compute only: which attention kernel runs"),
    "parallel.tensor_parallel": LAYOUT,
    "parallel.dist_timeout_s": GUARD,
    "parallel.startup_timeout_s": GUARD,
    "parallel.watchdog_timeout_s": GUARD,
    "parallel.device": LAYOUT,
    "train.seq_length": _experiment("the samples and the data position"),
    "train.global_batch_size": _experiment("the samples per step, the data position, the L2E statistics"),
    "train.micro_batch_size": LAYOUT,
    "train.train_iters": _free("the run's length: a finished run may train further (see optimizer.lr_decay_iters)"),
    "train.seed": _experiment("the initialization and the data order"),
    "train.activation_checkpointing": LAYOUT,
    "train.compile": LAYOUT,
    **{f"train.{key}": INTERVALS for key in (
        "log_interval", "eval_interval", "eval_iters", "save_interval", "keep_last_n", "save_schedule",
        "extra_save_steps", "preempt_check_every")},
    "train.output_dir": _free("where the run is"),
    "train.resume": _free("whether to continue the run in output_dir"),
    "train.preempt_signals": GUARD,
    "train.init_from": _experiment("the initial weights"),
    "train.branch_step": _experiment("the data position and schedule of a branched run"),
    "train.nonfinite_patience": GUARD,
    "train.lock_heartbeat_s": GUARD,
    **{f"optimizer.{key}": OPTIMIZER for key in (
        "lr", "min_lr_ratio", "warmup_fraction", "decay_style", "betas", "eps", "weight_decay", "grad_clip",
        "branch_warmup_iters", "schedule")},
    "optimizer.lr_decay_iters": _experiment("the schedule's length (null = train.train_iters)",
                                            effective=_schedule_length),
    "deepspeed.zero_stage": LAYOUT,
    "deepspeed.precision": _experiment("the numerics of every step"),
    "deepspeed.initial_scale_power": FP16,
    "deepspeed.loss_scale_window": FP16,
    "deepspeed.extra": _free("DeepSpeed's own tuning (what defines the run is refused there)"),
    **{f"data.{key}": DATA for key in (
        "paths", "weights", "split", "tokenizer", "eod_token", "labels", "order", "order_batch_size", "valid_paths",
        "index_maps", "data_seed")},
    "data.cache_dir": _free("where index caches live"),
    "l2e.method": _experiment("the inhibition method (none, l2e, memel)"),
    **{f"l2e.{key}": L2E for key in (
        "layers", "activation", "retrieval", "inhibit_ratio", "topk", "reg_lambda", "reduction", "delta", "eps",
        "forget_steps", "late_start", "threshold_lr", "rd_strength", "fkr", "num_features", "eval_reference_score")},
    "l2e.grad_precision": _experiment("whether the regularizer's gradient reaches the weights whole in bf16",
                                      applies=_l2e_on),
    "l2e.max_nonfinite_steps": GUARD,
    "l2e.backend": _free("compute only: which implementation of the same pass runs"),
    **{f"logging.{key}": LOGGING for key in (
        "tensorboard", "wandb", "wandb_project", "wandb_mode", "progress_bar", "histogram_size")},
}


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the run config, dotted (a dict-valued key such as deepspeed.extra is one leaf)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _comparable(cfg: dict, key: str, rule: Rule) -> Any:
    value = rule.effective(cfg) if rule.effective is not None else _get(cfg, key)
    return list(value) if isinstance(value, tuple) else value


def experiment_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for each experiment key that differs. `saved` is a config dict as a run
    recorded it (config.yaml, a checkpoint's client state); keys it lacks (an older version's) are not compared."""
    full_saved = _with_defaults(saved)
    differences = []
    for key, rule in KEY_RULES.items():
        if rule.kind != "experiment" or not _has(saved, key):
            continue
        if rule.applies is not None and not (rule.applies(full_saved) and rule.applies(current)):
            continue  # e.g. L2E settings when one of the runs has no L2E: l2e.method already differs
        before, now = _comparable(full_saved, key, rule), _comparable(current, key, rule)
        if before != now:
            differences.append((key, before, now))
    return differences


def _has(cfg: dict, dotted: str) -> bool:
    try:
        _get(cfg, dotted)
    except (KeyError, TypeError):
        return False
    return True


def _with_defaults(saved: dict) -> dict:
    """The saved dict over today's defaults, so that rules reading several keys find them all."""
    merged = config_to_dict(RunConfig())
    for section, values in saved.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
    return merged


def describe_differences(differences: list[tuple[str, Any, Any]]) -> str:
    shown = [f"{key}: {before!r} -> {now!r}" for key, before, now in differences[:SHOWN_DIFFERENCES]]
    more = len(differences) - SHOWN_DIFFERENCES
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


class RunIdentityError(CheckpointError):
    """The output directory holds another experiment than the config describes."""


def check_same_experiment(saved: dict, cfg: RunConfig, where: str) -> None:
    """Refuse, in one line naming the differing keys and the fix, to continue the run recorded in `where`
    (its config dict `saved`) with a config `cfg` that describes another experiment."""
    differences = experiment_differences(saved, config_to_dict(cfg))
    if not differences:
        return
    keys = {key for key, _, _ in differences}
    hint = ""
    if "optimizer.lr_decay_iters" in keys:
        old = next(before for key, before, _ in differences if key == "optimizer.lr_decay_iters")
        hint = f" (to train longer on the same schedule, set optimizer.lr_decay_iters={old})"
    raise RunIdentityError(
        f"{where} holds another experiment ({describe_differences(differences)}){hint}: resume with the same "
        "config, or start a new run with another train.output_dir (and train.init_from=<its checkpoint> to "
        "start from its weights)"
    )
