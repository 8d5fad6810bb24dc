"""Read a DeepSpeed checkpoint directory of any ZeRO stage, TP size and DP size as full-width tensors.

DeepSpeed's zero_to_fp32 cannot merge tensor-parallel shards and its ds_to_universal skips stage 0, so this
reader is ours. It serves HF export, resuming on another layout and `train.init_from`, one parameter at a
time from memory-mapped shard files (peak memory: about one full parameter per state kind).

No file is unpickled with arbitrary code: everything goes through `safe_load` (torch.load weights_only=True,
mmap). DeepSpeed's optimizer shards hold four small non-tensor types (a loss-scaler record, a stage enum, a
fragment address); they are allowlisted under their DeepSpeed names but rebuilt as plain stand-ins, so reading
needs no DeepSpeed import and never runs DeepSpeed code.

File layouts (deepspeed 0.19; `tp` is 2-digit):
  stage 0    mp_rank_{tp}_model_states.pt: 'module' (TP-local fp32 weights), 'optimizer' (torch state dict,
             params by index: their names are recorded by save_checkpoint in client state)
  stage 1/2  mp_rank_{tp}_model_states.pt + zero_pp_rank_{dp}_mp_rank_{tp}_optim_states.pt: per param group a
             flat fp32 partition per DP rank, with param_slice_mappings name -> (start, numel) into it
  stage 3    zero_pp_rank_{dp}_mp_rank_{tp}_{model,optim}_states.pt: each parameter split into ceil(numel/dp)
             pieces, in param_shapes order, concatenated per sub-group on every DP rank
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from l2e_dist.errors import UserError
from l2e_dist.model.tp_layout import merge_shards, partition_dim

OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq")  # AdamW moments, stored next to the fp32 master weights
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_Z3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# Keys DeepSpeed itself writes into the model-states file; everything else is the trainer's client state.
DEEPSPEED_KEYS = frozenset(
    {
        "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
        "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
        "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
        "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info",
    }
)


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory that is incomplete, inconsistent or not a DeepSpeed/l2e-dist checkpoint."""


class _Record:
    """Plain stand-in for DeepSpeed's pickled records (loss scaler, fragment address): attributes only."""

    def __repr__(self) -> str:
        return f"_Record({self.__dict__})"


def _enum_value(value: int) -> int:
    return int(value)


_ALLOWED_GLOBALS = [
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
]


def safe_load(path: str | Path) -> Any:
    """torch.load with weights_only=True (no arbitrary code), memory-mapped, on CPU. A file that needs any
    other global is refused with a message naming it."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or ValueError depending on the damage
        raise CheckpointFormatError(f"{path} cannot be loaded safely: {_why_unloadable(path, exc)}") from exc


def _why_unloadable(path: Path, exc: Exception) -> str:
    try:  # a static scan of the pickle: names the globals without importing or calling them
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not even a readable archive: truncated or corrupt
        unsafe = set()
    unsafe -= {name for _, name in _ALLOWED_GLOBALS}
    if unsafe:
        return f"it needs {sorted(unsafe)}, which weights-only loading refuses (loading it could run code)"
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class DeepSpeedCheckpoint:
    """One checkpoint directory (e.g. `checkpoints/global_step1000`), read lazily.

    `full(name, kind)` is the full-width (TP-merged, DP-gathered) tensor of one parameter; kind is "fp32"
    (master weights) or one of OPTIMIZER_KINDS.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointFormatError(f"{self.directory} is not a directory")
        self._files: dict[str, Any] = {}
        files = [p.name for p in self.directory.iterdir()]
        self._optim_file = {(int(m[2]), int(m[1])): n for n in files if (m := _OPTIM_FILE.match(n))}
        z3_models = {(int(m[2]), int(m[1])): n for n in files if (m := _Z3_MODEL_FILE.match(n))}
        models = {int(m[1]): n for n in files if (m := _MODEL_FILE.match(n))}
        if not (z3_models or models):
            raise CheckpointFormatError(f"{self.directory} holds no DeepSpeed model-states file (*_model_states.pt)")
        head = self._load(next(iter(sorted(z3_models.values()) or sorted(models.values()))))
        # The sizes the checkpoint was written with (the file names alone cannot reveal a missing last shard).
        self.tp_size = int(head.get("mp_world_size", 1))
        self.dp_size = int(head.get("dp_world_size", 1))
        if z3_models:
            self.zero_stage = 3
            self._model_file = {tp: z3_models.get((tp, 0)) for tp in range(self.tp_size)}
        else:
            self._model_file = {tp: models.get(tp) for tp in range(self.tp_size)}
            self.zero_stage = int(self._optimizer_shard(0, 0).get("zero_stage", 1)) if self._optim_file else 0
        missing = [f"model states of TP rank {tp}" for tp, name in self._model_file.items() if name is None]
        if self.zero_stage > 0:
            expected = {(tp, dp) for tp in range(self.tp_size) for dp in range(self.dp_size)}
            missing += [f"optimizer shard tp={tp} dp={dp}" for tp, dp in sorted(expected - set(self._optim_file))]
        if missing:
            raise CheckpointFormatError(f"{self.directory} is incomplete: missing {', '.join(missing)}")

    # ---------------------------------------------------------------- files
    def _load(self, name: str) -> Any:
        if name not in self._files:
            self._files[name] = safe_load(self.directory / name)
        return self._files[name]

    def _model_states(self, tp: int) -> dict:
        return self._load(self._model_file[tp])

    def _optimizer_shard(self, tp: int, dp: int) -> dict:
        name = self._optim_file.get((tp, dp))
        if name is None:
            raise CheckpointFormatError(f"{self.directory}: missing optimizer shard tp={tp} dp={dp}")
        state = self._load(name)
        if "optimizer_state_dict" not in state:
            raise CheckpointFormatError(f"{self.directory / name} has no optimizer_state_dict")
        return state["optimizer_state_dict"]

    # ---------------------------------------------------------------- metadata
    @cached_property
    def client_state(self) -> dict:
        """What the trainer passed as client_state (step, consumed_samples, config, l2e, layout, ...)."""
        return {k: v for k, v in self._model_states(0).items() if k not in DEEPSPEED_KEYS}

    @cached_property
    def engine_state(self) -> dict:
        """DeepSpeed's own engine counters and the LR scheduler state (all layout-independent)."""
        head = self._model_states(0)
        return {k: head.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}

    @cached_property
    def _local_shapes(self) -> list[dict[str, torch.Size]]:
        """Per TP rank: parameter name -> TP-local shape, in DeepSpeed's flattening order."""
        shapes = []
        for tp in range(self.tp_size):
            states = self._model_states(tp)
            if self.zero_stage == 0:
                module = states["module"]
                shapes.append({k: v.shape for k, v in module.items() if isinstance(v, torch.Tensor)})
            else:
                shapes.append({k: torch.Size(v) for group in states["param_shapes"] for k, v in group.items()})
        return shapes

    @property
    def names(self) -> list[str]:
        return list(self._local_shapes[0])

    def local_shape(self, name: str, tp: int = 0) -> torch.Size:
        """Shape of `name` on TP rank `tp` (from the model-states file: no shard is read)."""
        return self._local_shapes[tp][name]

    @cached_property
    def has_optimizer_state(self) -> bool:
        if self.zero_stage == 0:
            optimizer = self._model_states(0).get("optimizer")
            return bool(optimizer and optimizer.get("state")) and "optimizer_param_names" in self.client_state
        shard = self._optimizer_shard(0, 0)
        base = shard.get("base_optimizer_state", shard.get("optimizer_state_dict"))
        return bool(base and base.get("state"))

    # ---------------------------------------------------------------- tensors
    def full(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """Full-width tensor: TP shards merged by the tp_layout table (replicated ones must agree)."""
        shards = [self.local(name, kind, tp) for tp in range(self.tp_size)]
        if partition_dim(name) is None:
            for tp, shard in enumerate(shards[1:], start=1):
                if not torch.allclose(shard, shards[0], rtol=1e-5, atol=1e-7):
                    diff = (shard - shards[0]).abs().max().item()
                    raise CheckpointFormatError(
                        f"{self.directory}: replicated {name} ({kind}) differs between TP ranks 0 and {tp} "
                        f"(max |diff| {diff:.3g}): the checkpoint is inconsistent"
                    )
        return merge_shards(name, shards)

    def local(self, name: str, kind: str, tp: int) -> torch.Tensor:
        """This TP rank's tensor, gathered over the DP (ZeRO) partitions, as an fp32 copy."""
        if name not in self._local_shapes[tp]:
            raise CheckpointFormatError(f"{self.directory}: no parameter {name!r} on TP rank {tp}")
        if kind != "fp32" and not self.has_optimizer_state:
            raise CheckpointFormatError(f"{self.directory} holds no optimizer state ({kind} of {name})")
        shape = self._local_shapes[tp][name]
        if self.zero_stage == 0:
            tensor = self._stage0_tensor(name, kind, tp)
        elif self.zero_stage == 3:
            tensor = self._stage3_flat(name, kind, tp, shape.numel())
        else:
            tensor = self._partitioned_flat(name, kind, tp, shape.numel())
        return tensor.reshape(shape).to(torch.float32, copy=True)

    def _stage0_tensor(self, name: str, kind: str, tp: int) -> torch.Tensor:
        states = self._model_states(tp)
        if kind == "fp32":
            return states["module"][name]
        index = self._stage0_optimizer_index[name]
        return states["optimizer"]["state"][index][kind]

    @cached_property
    def _stage0_optimizer_index(self) -> dict[str, int]:
        groups = self._model_states(0)["optimizer"]["param_groups"]
        names = self.client_state["optimizer_param_names"]
        if [len(g["params"]) for g in groups] != [len(n) for n in names]:
            raise CheckpointFormatError(f"{self.directory}: optimizer_param_names do not match the optimizer groups")
        return {n: i for g, group_names in zip(groups, names) for i, n in zip(g["params"], group_names)}

    def _flat_state(self, shard: dict, kind: str, group: int, flats_key: str, base_key: str) -> torch.Tensor:
        if kind == "fp32":
            return shard[flats_key][group]
        base = shard[base_key]
        index = [i for g in base["param_groups"] for i in g["params"]][group]
        return base["state"][index][kind]

    def _partitioned_flat(self, name: str, kind: str, tp: int, numel: int) -> torch.Tensor:
        """ZeRO 1/2: concatenate this parameter's fragments over the DP partitions, in rank order."""
        pieces = []
        for dp in range(self.dp_size):
            shard = self._optimizer_shard(tp, dp)
            for group, mapping in enumerate(shard["param_slice_mappings"]):
                if name in mapping:
                    address = mapping[name]
                    flat = self._flat_state(shard, kind, group, "single_partition_of_fp32_groups",
                                            "base_optimizer_state")
                    pieces.append(flat.narrow(0, address.start, address.numel))
        flat = torch.cat(pieces) if pieces else torch.empty(0)
        if flat.numel() != numel:
            raise CheckpointFormatError(f"{self.directory}: {name} has {flat.numel()} of {numel} elements in the "
                                        "ZeRO shards (missing or foreign shard)")
        return flat

    @cached_property
    def _stage3_offsets(self) -> dict[str, tuple[int, int, int]]:
        """ZeRO 3: name -> (sub-group, offset of its piece in that sub-group's flat tensor, piece numel)."""
        table = {}
        for tp in range(self.tp_size):
            for group, shapes in enumerate(self._model_states(tp)["param_shapes"]):
                offset = 0
                for name, shape in shapes.items():
                    piece = math.ceil(math.prod(shape) / self.dp_size)
                    table[(tp, name)] = (group, offset, piece)
                    offset += piece
        return table

    def _stage3_flat(self, name: str, kind: str, tp: int, numel: int) -> torch.Tensor:
        group, offset, piece = self._stage3_offsets[(tp, name)]
        pieces = []
        for dp in range(self.dp_size):
            flat = self._flat_state(self._optimizer_shard(tp, dp), kind, group, "fp32_flat_groups",
                                    "optimizer_state_dict")
            if offset + piece > flat.numel():
                raise CheckpointFormatError(f"{self.directory}: ZeRO-3 shard tp={tp} dp={dp} is too short for {name}")
            pieces.append(flat.narrow(0, offset, piece))
        return torch.cat(pieces)[:numel]

    # ---------------------------------------------------------------- optimizer metadata
    def _base_optimizer(self) -> dict:
        if self.zero_stage == 0:
            return self._model_states(0)["optimizer"]
        shard = self._optimizer_shard(0, 0)
        return shard["optimizer_state_dict"] if self.zero_stage == 3 else shard["base_optimizer_state"]

    def optimizer_step(self) -> torch.Tensor:
        """AdamW's step counter (the same for every parameter)."""
        for state in self._base_optimizer()["state"].values():
            if "step" in state:
                step = state["step"]
                return step.clone() if isinstance(step, torch.Tensor) else torch.tensor(float(step))
        raise CheckpointFormatError(f"{self.directory}: the optimizer state has no step counter")

    def param_group_hyperparameters(self) -> list[dict]:
        """Per optimizer param group (in the order build_optimizer creates them): lr, betas, weight_decay, ..."""
        groups = self._base_optimizer()["param_groups"]
        if self.zero_stage == 3:  # one torch group per original group, holding that group's sub-group tensors
            groups = [g for g in groups if g["params"]]
        return [{k: v for k, v in g.items() if k != "params"} for g in groups]

    def loss_scaler_state(self) -> dict | None:
        """fp16 dynamic loss-scale state ({'cur_scale': ..., ...}) when the optimizer kept one."""
        if self.zero_stage == 0:
            return None
        scaler = self._optimizer_shard(0, 0).get("loss_scaler")
        return dict(scaler.__dict__) if isinstance(scaler, _Record) else None
