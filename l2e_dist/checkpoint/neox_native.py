"""Read EleutherAI's native GPT-NeoX checkpoints (`global_stepN/` of gpt-neox + DeeperSpeed 0.3.15, PipelineModule,
ZeRO-1 elastic, fp16): the weights, fp32 master weights, Adam moments, counters, lr-scheduler position and loss
scaler of Pythia's published `EleutherAI/neox-ckpt-pythia-*` revisions, under our parameter names.

The format (docs/neox-checkpoints.md has the whole table):
  layer_{i:02d}-model_{t:02d}-model_states.pt   pipeline layer i's state_dict on TP rank t, fp16 (0: embedding,
                                                2 .. L+1: transformer layers, L+3: final norm, L+4: output layer)
  mp_rank_{t:02d}_model_states.pt               engine counters, AnnealingLR state, gpt-neox `iteration`, `args`
  zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt   ZeRO-1 elastic state of DP rank d: per param group C
                                                rank-interleaved sub-partitions of the flat group (padding cut)

`NeoxNativeCheckpoint` has the interface of ds_files.DeepSpeedCheckpoint (`full(name, kind)`, `optimizer_step`,
`loss_scaler_state`, ...), so `reshard.load_resharded` puts it onto any TP / DP / ZeRO stage of ours.

Memory: tensors are memory-mapped (torch.load mmap=True). A ZeRO file is opened only while one parameter is read
for one tensor (a parameter's master, or one of its moments) and released before the next (a layer file: while its
pipeline layer is read), so the file pages a rank has mapped never exceed one parameter's state (one layer's weights); the rank's extra memory is about one full-width parameter per state kind (merged over the
source's TP shards, then cut to the target's slice).

Pickles: the files hold a DeeperSpeed DynamicLossScaler, numpy RNG state and plain containers. `neox_load` unpickles
with an allowlist: torch's weights-only globals, numpy's array reconstruction, and any `deepspeed.*` / `megatron.*`
class mapped to `NeoxRecord` (attributes only; no DeeperSpeed code exists here or runs). Anything else is refused.
"""

from __future__ import annotations

import math
import pickle
import re
import types
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from l2e_dist.checkpoint.compat import VOCAB_ROW_TENSORS, resize_vocab_rows
from l2e_dist.checkpoint.ds_files import OPTIMIZER_KINDS, CheckpointFormatError, DeepSpeedCheckpoint
from l2e_dist.checkpoint.manifest import CheckpointError
from l2e_dist.model.config import ModelConfig
from l2e_dist.model.tp_layout import merge_shards, partition_dim, split_tensor

NEOX_FORMAT = "gpt-neox-native"  # client_state["format"] of this reader
WEIGHT_KIND = "weight"  # full(name, WEIGHT_KIND): the training-dtype weights of the layer files (as fp32)
_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZERO_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_LAYER_KEYS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
)  # fmt: skip
_BUFFERS = (".inv_freq",)  # rotary inverse frequencies: recomputed by our model
_NUMPY_GLOBALS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                  "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
_RECORD_MODULES = ("deepspeed", "megatron", "apex")
MAX_VOCAB_PADDING = 1024  # Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP (<= 128 x 8)


class NeoxRecord:
    """Stand-in for a DeeperSpeed / Megatron object in a pickle (e.g. the DynamicLossScaler): it only receives
    the object's attributes, so unpickling runs none of that code (which does not exist here)."""

    source = "?"

    def __init__(self, *args: Any):
        self.args = args

    def __repr__(self) -> str:
        return f"NeoxRecord<{self.source}>({self.__dict__})"


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        import torch._weights_only_unpickler as weights_only

        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 pickles name Python 2 modules
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        allowed = weights_only._get_allowed_globals()
        if full in allowed:
            return allowed[full]
        if full in _NUMPY_GLOBALS or module in ("numpy.dtypes", "numpy"):
            import numpy

            target: Any = numpy
            for part in full.split(".")[1:]:
                target = getattr(target, part)
            if module == "numpy" and not isinstance(target, type):
                raise _RefusedGlobal(f"it needs {full}, which is not a type")
            return target
        if module.split(".")[0] in _RECORD_MODULES:
            return type(name, (NeoxRecord,), {"source": full})
        raise _RefusedGlobal(f"it needs {full}, which is not a tensor, container or DeepSpeed record")


_PICKLE_MODULE = types.SimpleNamespace(Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
                                       __name__="l2e_neox_pickle")


def neox_load(path: str | Path) -> Any:
    """torch.load of a gpt-neox/DeeperSpeed file, memory-mapped, with the allowlisting unpickler above."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_PICKLE_MODULE)
    except _RefusedGlobal as exc:
        raise CheckpointFormatError(f"{path} is refused: {exc} (loading it could run code); it is not a file "
                                    "of a gpt-neox checkpoint") from None
    except Exception as exc:  # zip errors (truncation), unpickling errors, refused globals
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointFormatError(f"{path} cannot be read ({reason}): the file is truncated or damaged, "
                                    "download it again") from None


def is_neox_native(path: str | Path) -> bool:
    """A gpt-neox `global_stepN` directory (pipeline layer files next to mp_rank_00_model_states.pt)."""
    path = Path(path)
    return (path / "mp_rank_00_model_states.pt").is_file() and (path / "layer_00-model_00-model_states.pt").is_file()


def neox_to_ours(neox_name: str, num_layers: int) -> str | None:
    """`2.attention.dense.weight` -> `layers.0.attention.dense.weight` (None for buffers)."""
    index, key = neox_name.split(".", 1)
    i = int(index)
    if key.endswith(_BUFFERS):
        return None
    if i == 0 and key == "word_embeddings.weight":
        return "embed_in.weight"
    if 2 <= i < num_layers + 2 and key in _LAYER_KEYS:
        return f"layers.{i - 2}.{key}"
    if i == num_layers + 3 and key in ("norm.weight", "norm.bias"):
        return "final_layer_norm." + key.split(".")[1]
    if i == num_layers + 4 and key == "final_linear.weight":
        return "embed_out.weight"
    raise CheckpointFormatError(f"unknown gpt-neox parameter {neox_name!r} for {num_layers} layers")


def ours_to_neox(name: str, num_layers: int) -> tuple[int, str]:
    """Our name -> (pipeline layer index, key in that layer's state_dict)."""
    if name == "embed_in.weight":
        return 0, "word_embeddings.weight"
    if name == "embed_out.weight":
        return num_layers + 4, "final_linear.weight"
    if name.startswith("final_layer_norm."):
        return num_layers + 3, "norm." + name.split(".")[1]
    _, layer, key = name.split(".", 2)
    return int(layer) + 2, key


def no_weight_decay(neox_name: str) -> bool:
    """gpt-neox's param groups: LayerNorm parameters and every bias in group 1 (no decay), the rest in group 0."""
    return "norm" in neox_name.split(".", 2)[1] or neox_name.endswith(".bias")


def layer_indices(num_layers: int) -> list[int]:
    """Pipeline layers that have files (1 and L+2 are functions)."""
    return [0, *range(2, num_layers + 2), num_layers + 3, num_layers + 4]


class NeoxNativeCheckpoint(DeepSpeedCheckpoint):
    """One gpt-neox `global_stepN/` directory, read lazily, under our parameter names."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointFormatError(f"{self.directory} is not a directory")
        if not is_neox_native(self.directory):
            raise CheckpointFormatError(f"{self.directory} is not a gpt-neox checkpoint directory (no "
                                        "mp_rank_00_model_states.pt and layer_00-model_00-model_states.pt)")
        self._files: dict[str, Any] = {}
        self._open_zero: dict[tuple[int, int], dict] = {}
        self._open_for: tuple[str, str] | None = None
        self._open_layer: int | None = None
        head = neox_load(self.directory / "mp_rank_00_model_states.pt")
        self._head = {k: v for k, v in head.items() if k not in ("module", "optimizer")}
        head_file = "mp_rank_00_model_states.pt"
        args = self._head.get("args")
        if not isinstance(args, dict) or "num_layers" not in args:
            raise CheckpointFormatError(f"{self.directory / head_file} has no gpt-neox `args` (num_layers, ...): "
                                        "not a gpt-neox checkpoint")
        self.args = args
        self.num_layers = int(args["num_layers"])
        self.tp_size = int(self._head.get("mp_world_size", 1))
        self.dp_size = int(self._head.get("dp_world_size", 1))
        self.zero_stage = 1
        if int(args.get("model_parallel_size", self.tp_size)) != self.tp_size:
            raise CheckpointFormatError(f"{self.directory / head_file}: args.model_parallel_size="
                                        f"{args['model_parallel_size']} but mp_world_size={self.tp_size}: the "
                                        "files come from different runs; download the directory again")
        self._check_file_set(head_file)
        for tp in range(1, self.tp_size):  # every TP rank's engine file must be of the same step
            other = neox_load(self.directory / f"mp_rank_{tp:02d}_model_states.pt")
            if (other.get("iteration"), other.get("global_steps")) != (self.iteration, self._head.get("global_steps")):
                raise CheckpointFormatError(f"{self.directory / f'mp_rank_{tp:02d}_model_states.pt'} is of iteration "
                                            f"{other.get('iteration')}, {head_file} of {self.iteration}: files of "
                                            "different steps; download the directory again")
        self._meta = [self._zero_metadata(tp) for tp in range(self.tp_size)]

    # ---------------------------------------------------------------- files
    def _check_file_set(self, head_file: str) -> None:
        names = [p.name for p in self.directory.iterdir()]
        sizes = f"mp_world_size={self.tp_size}, dp_world_size={self.dp_size} in {head_file}"
        mp = {int(m[1]) for n in names if (m := _MP_FILE.match(n))}
        zero = {(int(m[2]), int(m[1])) for n in names if (m := _ZERO_FILE.match(n))}
        layers = {(int(m[1]), int(m[2])) for n in names if (m := _LAYER_FILE.match(n))}
        expected_layers = {(i, t) for i in layer_indices(self.num_layers) for t in range(self.tp_size)}
        expected_zero = {(t, d) for t in range(self.tp_size) for d in range(self.dp_size)}
        extra = sorted(f"mp_rank_{t:02d}_model_states.pt" for t in mp - set(range(self.tp_size)))
        extra += sorted(f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for t, d in zero - expected_zero)
        extra += sorted(f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i, t in layers - expected_layers)
        if extra:
            raise CheckpointFormatError(f"{self.directory} holds {extra[0]}, which does not fit {sizes} and "
                                        f"num_layers={self.num_layers}: remove files of other runs or layouts")
        missing = sorted(f"mp_rank_{t:02d}_model_states.pt" for t in set(range(self.tp_size)) - mp)
        missing += sorted(f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i, t in expected_layers - layers)
        missing += sorted(f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for t, d in expected_zero - zero)
        if missing:
            raise CheckpointFormatError(f"{self.directory} lacks {missing[0]} ({len(missing)} file(s) missing for "
                                        f"{sizes}): download every file of the checkpoint directory")

    def _load(self, name: str) -> Any:
        if name not in self._files:
            self._files[name] = neox_load(self.directory / name)
        return self._files[name]

    def _zero_file(self, tp: int, dp: int) -> dict:
        """The ZeRO state of (tp, dp), checked against the partition layout; kept open for one parameter."""
        if (tp, dp) not in self._open_zero:
            name = f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt"
            state = neox_load(self.directory / name).get("optimizer_state_dict")
            self._check_zero_state(state, tp, dp, name)
            self._open_zero[(tp, dp)] = state
        return self._open_zero[(tp, dp)]

    def _check_zero_state(self, state: Any, tp: int, dp: int, name: str) -> None:
        path = self.directory / name
        keys = ("partition_count", "num_comm_intervals_per_group", "local_sub_partitions_of_fp32_groups",
                "base_optimizer_state")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise CheckpointFormatError(f"{path} is not a ZeRO-1 elastic optimizer state (no {keys}): "
                                        "download it again")
        if int(state["partition_count"]) != self.dp_size:
            raise CheckpointFormatError(f"{path} was written by {state['partition_count']} data-parallel ranks, "
                                        f"mp_rank_00_model_states.pt says dp_world_size={self.dp_size}: the "
                                        "files come from different runs")
        if not hasattr(self, "_meta"):
            return  # reading the metadata itself
        meta = self._meta[tp]
        if list(state["num_comm_intervals_per_group"]) != meta["intervals"]:
            raise CheckpointFormatError(f"{path}: num_comm_intervals_per_group {state['num_comm_intervals_per_group']}"
                                        f" differs from rank 0's {meta['intervals']}: the files come from different runs")
        for group, (numel, size) in enumerate(zip(meta["group_numel"], meta["sub_size"])):
            for interval in range(meta["intervals"][group]):
                expected = _piece_length(interval * self.dp_size + dp, size, numel)
                for kind in ("fp32", *OPTIMIZER_KINDS):
                    got = _piece(state, group, interval, kind).numel()
                    if got != expected:
                        raise CheckpointFormatError(
                            f"{path}: group {group} interval {interval} ({kind}) has {got} elements, the layout "
                            f"needs {expected}: a truncated or foreign shard; download it again")

    def _zero_metadata(self, tp: int) -> dict:
        """param_shapes and the partition geometry of TP rank `tp` (from its DP-rank-0 ZeRO file)."""
        name = f"zero_pp_rank_0_mp_rank_{tp:02d}_optim_states.pt"
        raw = neox_load(self.directory / name)
        state = raw.get("optimizer_state_dict") if isinstance(raw, dict) else None
        self._check_zero_state(state, tp, 0, name)
        shapes = raw.get("param_shapes")
        if not shapes:
            raise CheckpointFormatError(f"{self.directory / name} has no param_shapes: download it again")
        if isinstance(shapes, list):  # one dict per param group in some DeepSpeed versions
            shapes = {k: v for group in shapes for k, v in group.items()}
        groups: list[list[tuple[str, torch.Size]]] = [[], []]
        for neox_name, shape in shapes.items():
            ours = neox_to_ours(neox_name, self.num_layers)
            if ours is not None:
                groups[int(no_weight_decay(neox_name))].append((ours, torch.Size(shape)))
        intervals = [int(c) for c in state["num_comm_intervals_per_group"]]
        if len(intervals) != 2:
            raise CheckpointFormatError(f"{self.directory / name} has {len(intervals)} param groups, gpt-neox writes 2")
        where, group_numel, sub_size = {}, [], []
        for group, members in enumerate(groups):
            offset = 0
            for ours, shape in members:
                where[ours] = (group, offset, shape)
                offset += shape.numel()
            group_numel.append(offset)
            # Sub-partition size S: rank 0's first piece is never cut (padding only ends the flat group).
            sub_size.append(_piece(state, group, 0, "fp32").numel())
            if intervals[group] != math.ceil(math.ceil(offset / self.dp_size) / max(sub_size[-1], 1)):
                raise CheckpointFormatError(f"{self.directory / name}: group {group} of {offset} elements cannot have "
                                            f"{intervals[group]} intervals of {sub_size[-1]}: a truncated or foreign "
                                            "shard; download it again")
        scaler = state.get("loss_scaler")
        return {"where": where, "intervals": intervals, "group_numel": group_numel, "sub_size": sub_size,
                "loss_scaler": dict(vars(scaler)) if isinstance(scaler, NeoxRecord) else None,
                "dynamic": bool(state.get("dynamic_loss_scale", False))}

    # ---------------------------------------------------------------- metadata
    @cached_property
    def client_state(self) -> dict:
        return {"format": NEOX_FORMAT, "iteration": self.iteration, "args": dict(self.args)}

    @cached_property
    def engine_state(self) -> dict:
        """Engine counters; lr_scheduler None: AnnealingLR's state is not ours (see `num_iters`)."""
        return {"lr_scheduler": None, **{k: int(self._head.get(k) or 0)
                                         for k in ("global_steps", "global_samples", "skipped_steps")}}

    @property
    def iteration(self) -> int:
        """gpt-neox's step count (updates + skipped): the next update trains on global batch `iteration`."""
        return int(self._head.get("iteration", self._head.get("global_steps", 0)))

    @property
    def lr_scheduler(self) -> dict:
        return dict(self._head.get("lr_scheduler") or {})

    @property
    def num_iters(self) -> int:
        """AnnealingLR's position: the updates taken (fp16-skipped steps excluded)."""
        return int(self.lr_scheduler.get("num_iters", self.optimizer_step().item()))

    @property
    def names(self) -> list[str]:
        where = self._meta[0]["where"]
        order = ["embed_in.weight", *(f"layers.{i}.{k}" for i in range(self.num_layers) for k in _LAYER_KEYS),
                 "final_layer_norm.weight", "final_layer_norm.bias", "embed_out.weight"]
        return [name for name in order if name in where]

    def local_shape(self, name: str, tp: int = 0) -> torch.Size:
        return self._meta[tp]["where"][name][2]

    @property
    def has_optimizer_state(self) -> bool:
        return True

    def optimizer_step(self) -> torch.Tensor:
        """Adam's step count (not saved by DeeperSpeed): updates taken = global_steps - skipped_steps."""
        counters = self.engine_state
        return torch.tensor(float(counters["global_steps"] - counters["skipped_steps"]))

    def param_group_hyperparameters(self) -> list[dict]:
        """The ZeRO-1 elastic state saves no param groups: nothing to apply (the run's config gives lr, betas,
        eps and weight decay; one empty dict per group keeps the group count checked)."""
        return [{}, {}]

    def loss_scaler_state(self) -> dict | None:
        meta = self._meta[0]
        if meta["loss_scaler"] is None:
            return None
        return {**{k: v for k, v in meta["loss_scaler"].items() if k != "args"}, "dynamic": meta["dynamic"]}

    # ---------------------------------------------------------------- tensors
    def full(self, name: str, kind: str = "fp32") -> torch.Tensor:
        self._release_unless(name, kind)  # a rank's mapped pages stay within one tensor's
        return super().full(name, kind)

    def tp_slice(self, name: str, kind: str, tp_size: int, tp_rank: int, rows: int) -> torch.Tensor | None:
        """Target TP rank `tp_rank`'s slice of a TP-split parameter read from only the source shards it covers,
        when the source's TP size is a multiple of the target's (and vocabulary matrices keep their row count);
        None otherwise (the caller merges the full tensor)."""
        dim = partition_dim(name)
        if dim is None or self.tp_size % tp_size:
            return None
        if name in VOCAB_ROW_TENSORS and self.local_shape(name)[0] * self.tp_size != rows:
            return None
        self._release_unless(name, kind)
        per_rank = self.tp_size // tp_size
        return merge_shards(name, [self.local(name, kind, t) for t in range(tp_rank * per_rank, (tp_rank + 1) * per_rank)])

    def _release_unless(self, name: str, kind: str) -> None:
        """Release the mapped ZeRO files (and their touched pages) unless they belong to this tensor."""
        if (name, kind) != self._open_for:
            self._open_zero.clear()
            self._open_for = (name, kind)

    def local(self, name: str, kind: str, tp: int) -> torch.Tensor:
        """TP rank `tp`'s tensor (fp32 copy): from the layer file (WEIGHT_KIND) or gathered over the ZeRO pieces."""
        if name not in self._meta[tp]["where"]:
            raise CheckpointFormatError(f"{self.directory}: no parameter {name!r} on TP rank {tp}")
        group, offset, shape = self._meta[tp]["where"][name]
        if kind == WEIGHT_KIND:
            return self._layer_tensor(name, tp, shape)
        size, pieces = self._meta[tp]["sub_size"][group], []
        stop = offset + shape.numel()
        for j in range(offset // size, (stop - 1) // size + 1):  # the sub-partitions the parameter spans
            interval, dp = divmod(j, self.dp_size)
            piece = _piece(self._zero_file(tp, dp), group, interval, kind)
            lo, hi = max(offset, j * size) - j * size, min(stop, (j + 1) * size) - j * size
            pieces.append(piece[lo:hi])
        return torch.cat(pieces).reshape(shape).to(torch.float32, copy=True)

    def _layer_tensor(self, name: str, tp: int, shape: torch.Size) -> torch.Tensor:
        layer, key = ours_to_neox(name, self.num_layers)
        if layer != self._open_layer:  # keep only one pipeline layer's files mapped
            self._files.clear()
            self._open_layer = layer
        file = f"layer_{layer:02d}-model_{tp:02d}-model_states.pt"
        state = self._load(file)
        if key not in state or state[key].shape != shape:
            found = tuple(state[key].shape) if key in state else "nothing"
            raise CheckpointFormatError(f"{self.directory / file}: {key} is {found}, param_shapes say {tuple(shape)}: "
                                        "the files come from different runs")
        return state[key].to(torch.float32, copy=True)

    def release(self) -> None:
        """Unmap every file this reader holds."""
        self._files.clear()
        self._open_zero.clear()
        self._open_for = self._open_layer = None


def neox_architecture_mismatch(source: NeoxNativeCheckpoint, cfg: ModelConfig) -> str:
    """'' when the checkpoint's gpt-neox args describe `cfg`'s size, else which fields differ."""
    differ = [f"{key}={source.args.get(key)} (config {getattr(cfg, key)})"
              for key in ("num_layers", "hidden_size", "num_attention_heads") if source.args.get(key) != getattr(cfg, key)]
    rows = int(source.args.get("padded_vocab_size") or source.local_shape("embed_in.weight")[0] * source.tp_size)
    if cfg.vocab_size is not None and not cfg.vocab_size <= rows < cfg.vocab_size + MAX_VOCAB_PADDING:
        differ.append(f"padded_vocab_size={rows} (model.vocab_size {cfg.vocab_size}: another tokenizer)")
    return ", ".join(differ)


def check_neox_architecture(source: NeoxNativeCheckpoint, cfg: ModelConfig) -> None:
    mismatch = neox_architecture_mismatch(source, cfg)
    if mismatch:
        raise CheckpointError(f"train.init_from={source.directory}: its mp_rank_00_model_states.pt args say {mismatch}: "
                              "use the config of that model size (configs/pythia-<size>.yaml) and its tokenizer")


def load_neox_weights(model: torch.nn.Module, path: str | Path, tp_rank: int, tp_size: int) -> None:
    """`train.init_from` of a gpt-neox directory: this TP rank's slice of the layer files' weights (training dtype,
    cast to the model's), one parameter at a time. The fp32 masters replace them once the engine exists
    (training.neox_branch)."""
    source = NeoxNativeCheckpoint(path)
    check_neox_architecture(source, model.cfg)
    rows, vocab = int(model.padded_vocab_size), int(model.cfg.vocab_size or 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = source.tp_slice(name, WEIGHT_KIND, tp_size, tp_rank, rows)
            if local is None:
                local = split_tensor(name, resize_vocab_rows(name, source.full(name, WEIGHT_KIND), rows, vocab),
                                     tp_size, tp_rank)
            if local.shape != param.shape:
                raise CheckpointError(f"train.init_from={path}: {name} has shape {tuple(local.shape)} on TP rank "
                                      f"{tp_rank}, the model expects {tuple(param.shape)}: use the config of that "
                                      "model size")
            param.copy_(local)
    source.release()


def _piece(state: dict, group: int, interval: int, kind: str) -> torch.Tensor:
    try:
        if kind == "fp32":
            return state["local_sub_partitions_of_fp32_groups"][group][interval]
        return state["base_optimizer_state"][group][interval][kind]
    except (IndexError, KeyError, TypeError):
        raise CheckpointFormatError(f"group {group} interval {interval} has no {kind}: a truncated or foreign ZeRO "
                                    "shard; download the checkpoint again") from None


def _piece_length(index: int, size: int, numel: int) -> int:
    """Stored length of sub-partition `index` of a flat group of `numel` elements (padding cut)."""
    return max(0, min(size, numel - index * size))
