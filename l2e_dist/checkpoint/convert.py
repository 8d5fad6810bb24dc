"""Our training checkpoints <-> Hugging Face GPTNeoX directories, and weights-only initialisation.

    export_hf("runs/tiny-l2e", "hf-tiny")                # any ZeRO stage, any TP -> GPTNeoXForCausalLM dir
    import_hf("pythia-70m", "pythia-70m-tp2", tp=2)      # -> a checkpoint dir for `train.init_from`
    state, config = load_as_hf_state_dict("runs/tiny-l2e")  # HF-named tensors + HF config dict (NeuroMFA)

A "checkpoint path" may be a checkpoint directory (`.../checkpoints/global_step1000`, or an import_hf output),
a checkpoints directory holding `latest`, or a run's output_dir. Weights are the fp32 master weights, merged
over ZeRO partitions and TP shards by l2e_dist.checkpoint.ds_files.

Vocabulary rows: our embedding and output matrices are padded to `make_vocab_size_divisible_by x TP` rows
(Megatron's convention); an HF export keeps the padded size as its vocab_size, as Pythia's published configs do.
When a checkpoint is loaded at a TP size with a different padded size, rows past the real vocabulary are cut or
zero-filled (zero output rows give a 0 logit to tokens the tokenizer never produces).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from l2e_dist.checkpoint.compat import (
    IMPORT_FORMAT,
    VOCAB_ROW_TENSORS,
    architecture_mismatch,
    pythia_gelu_note,
    resize_vocab_rows,
)
from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
from l2e_dist.checkpoint.hf import (
    PYTHIA_GELU_LABEL,
    from_hf_state_dict,
    hf_config_dict,
    model_config_from_hf,
    to_hf_state_dict,
)
from l2e_dist.checkpoint.manifest import (
    CheckpointError,
    find_resume_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from l2e_dist.checkpoint.neox_native import is_neox_native, load_neox_weights
from l2e_dist.config_utils import build
from l2e_dist.model.config import ModelConfig
from l2e_dist.model.tp_layout import partition_dim, split_tensor

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
IMPORTED_TOKENIZER_DIR = "hf_tokenizer"  # an import keeps the HF tokenizer files here, for the way back
HF_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # export weights


def is_hf_directory(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHT_FILES)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by `path` (see module docstring), verified against its manifest."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if any(path.glob("*_model_states.pt")):
        if (path / "manifest.json").is_file() and (problem := verify_checkpoint(path)) is not None:
            raise CheckpointError(f"{path} is damaged: {problem}")
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            found = find_resume_checkpoint(root)
            if found is not None:
                return found
    raise CheckpointError(
        f"{path} is not a checkpoint: give a checkpoint directory (.../checkpoints/global_step1000), "
        "a checkpoints directory with a `latest` file, or a run output_dir"
    )


class WeightSource:
    """Full-width fp32 weights (our names) plus the model config of a checkpoint or an HF directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.run_config: dict = {}
        self.token_ids: dict[str, int] = {}
        self.hf_hidden_act: str | None = None  # the HF config.json label the weights came with
        if is_hf_directory(self.path):
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(str(self.path))
            if hf_cfg.model_type != "gpt_neox":
                raise CheckpointError(f"{self.path} is a {hf_cfg.model_type!r} model, not GPTNeoX/Pythia")
            try:
                self.model_config = model_config_from_hf(hf_cfg)
            except ValueError as exc:
                raise CheckpointError(f"{self.path / 'config.json'}: {exc}; not a model l2e-dist can load") from None
            self.hf_hidden_act = hf_cfg.hidden_act
            ids = {k: getattr(hf_cfg, k, None) for k in ("bos_token_id", "eos_token_id")}
            self.token_ids = {k: v for k, v in ids.items() if v is not None}
            self._hf = _LazyHFTensors(self.path)  # read per tensor (or per TP slice), never all at once
            self._weights = None
            self.checkpoint = None
            return
        if is_neox_native(self.path):
            raise CheckpointError(f"{self.path} is a native gpt-neox checkpoint: convert it first with `l2e-convert "
                                  f"from-neox {self.path} OUT --tp N` (train.init_from reads it directly)")
        self.checkpoint_dir = resolve_checkpoint(self.path)
        self.checkpoint = DeepSpeedCheckpoint(self.checkpoint_dir)
        self.run_config = self.checkpoint.client_state.get("config") or {}
        if "model" not in self.run_config:
            raise CheckpointError(f"{self.checkpoint_dir} records no model config (not an l2e-dist checkpoint)")
        self.model_config = build(ModelConfig, self.run_config["model"], "model")
        self.token_ids = dict(self.checkpoint.client_state.get("hf_token_ids") or {})
        self.hf_hidden_act = self.checkpoint.client_state.get("hf_hidden_act")  # an import_hf output's label
        self._hf = None

    @property
    def pythia_gelu_label(self) -> bool:
        """The weights come from a gpt_neox HF config labelled "gelu" (directly or through import_hf): Pythia's
        label for its tanh-trained models, accepted by a tanh run config."""
        return self.hf_hidden_act == PYTHIA_GELU_LABEL

    @property
    def names(self) -> list[str]:
        return self._hf.names if self.checkpoint is None else self.checkpoint.names

    def tensor(self, name: str) -> torch.Tensor:
        """The full fp32 tensor `name`."""
        return self._hf.full(name).float() if self.checkpoint is None else self.checkpoint.full(name)

    def tp_shard(self, name: str, rows: int, real_vocab: int, tp_size: int, tp_rank: int) -> torch.Tensor:
        """This TP rank's fp32 shard of `name` (vocabulary matrices resized to `rows` padded rows first). From an
        HF directory only the shard's bytes are read; a training checkpoint is merged first (its own layout)."""
        if self.checkpoint is not None:
            return split_tensor(name, resize_vocab_rows(name, self.tensor(name), rows, real_vocab), tp_size, tp_rank)
        shape = self._hf.shape(name)
        dim = partition_dim(name) if tp_size > 1 else None
        if name in VOCAB_ROW_TENSORS and shape[0] != rows:
            if rows < real_vocab:
                raise CheckpointError(f"{name}: cannot shrink to {rows} rows, the vocabulary has {real_vocab} tokens")
            shape = (rows, *shape[1:])
        if dim is None:
            return resize_vocab_rows(name, self._hf.full(name), rows, real_vocab).float()
        if shape[dim] % tp_size:
            raise CheckpointError(f"{name}: dim {dim} of size {shape[dim]} does not split into {tp_size} TP shards")
        size = shape[dim] // tp_size
        start, stop = tp_rank * size, (tp_rank + 1) * size
        stored = self._hf.shape(name)[dim]
        part = self._hf.slice(name, dim, min(start, stored), min(stop, stored)).float()
        if part.shape[dim] < size:  # padding rows of the vocabulary beyond the stored ones are zero
            pad = list(part.shape)
            pad[dim] = size - part.shape[dim]
            part = torch.cat([part, part.new_zeros(pad)], dim=dim)
        return part.contiguous()

    def padded_vocab_size(self) -> int:
        if self.checkpoint is None:
            return int(self._hf.shape("embed_in.weight")[0])
        return int(self.checkpoint.local_shape("embed_in.weight")[0]) * self.checkpoint.tp_size


class _LazyHFTensors:
    """The tensors of an HF directory under our names, read on demand: safetensors files through `safe_open`
    (a slice reads only its bytes), pytorch_model.bin memory-mapped."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._handles: dict[str, Any] = {}
        if (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        elif (directory / "model.safetensors.index.json").is_file():
            index = json.loads((directory / "model.safetensors.index.json").read_text())
            files = sorted(set(index["weight_map"].values()))
        else:
            files = []
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            self._tensors = from_hf_state_dict(state)
        self._where: dict[str, tuple[Any, str]] = {}
        for file in files:
            handle = safe_open(str(directory / file), framework="pt")
            self._handles[file] = handle
            for hf_name, ours in from_hf_state_dict({k: k for k in handle.keys()}).items():
                self._where[hf_name] = (handle, ours)
        if files:
            self._tensors = None

    @property
    def names(self) -> list[str]:
        return list(self._where) if self._tensors is None else list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[name].shape)
        handle, key = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def full(self, name: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name]
        handle, key = self._where[name]
        return handle.get_tensor(key)

    def slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[name].narrow(dim, start, stop - start)
        handle, key = self._where[name]
        view = handle.get_slice(key)
        return view[start:stop] if dim == 0 else view[:, start:stop]


def load_as_hf_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict under HF GPTNeoX names, HF config as a dict) of a training checkpoint at any TP/ZeRO
    layout, or of an HF directory."""
    source = WeightSource(path)
    weights = {name: source.tensor(name) for name in source.names}
    eos = source.token_ids.get("eos_token_id")
    return to_hf_state_dict(weights), hf_config_dict(source.model_config, source.padded_vocab_size(), eos)


def _atomic_directory(out_dir: Path):
    """A fresh temporary directory next to `out_dir`; the caller renames it into place when complete."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} exists and is not empty: remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out_dir, tmp


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked by _atomic_directory)
    os.replace(tmp, out_dir)


def exported_dtype(hf_dir: str | Path) -> str:
    """The weight dtype an HF directory's config.json declares (`dtype`, or the older `torch_dtype`)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def export_hf(checkpoint: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30,
              dtype: str = "float32") -> Path:
    """Write a `GPTNeoXForCausalLM` directory (config.json, safetensors weights, tokenizer files when the
    run's tokenizer is found) that `AutoModelForCausalLM.from_pretrained` loads with no extra code.

    `dtype` rounds the fp32 master weights (Pythia publishes float16); config.json declares it both as
    `dtype` (transformers 5) and `torch_dtype` (transformers 4, Pythia's configs), so `dtype="auto"` loads it."""
    from safetensors.torch import save_file

    if dtype not in HF_DTYPES:
        raise CheckpointError(f"unknown export dtype {dtype!r}: use one of {', '.join(HF_DTYPES)}")
    source = WeightSource(checkpoint)
    out_dir, tmp = _atomic_directory(Path(out_dir))
    try:
        tokenizer = _export_tokenizer(source, tmp)
        eos = tokenizer["eos_id"] if tokenizer else source.token_ids.get("eos_token_id")
        config = hf_config_dict(source.model_config, source.padded_vocab_size(), eos)
        config.update(dtype=dtype, torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in source.names:
            tensor = source.tensor(name).to(HF_DTYPES[dtype]).contiguous()
            if shards[-1] and size + tensor.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1].update(to_hf_state_dict({name: tensor}))
            size += tensor.nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.nbytes for shard in shards for t in shard.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------- tokenizer
def run_tokenizer_file(run_config: dict) -> Path | None:
    """The tokenizer a run trained with, from its saved config: data.tokenizer, else the `.meta.json` of its
    data prefixes (l2e-prepare-data output, or the default corpus when its cache still exists)."""
    data = run_config.get("data") or {}
    if data.get("tokenizer"):
        path = Path(data["tokenizer"])
        return path if path.is_file() else None
    prefixes = [Path(p) for p in data.get("paths") or []]
    if not prefixes and data.get("cache_dir") and (Path(data["cache_dir"]) / "default-corpus").is_dir():
        from l2e_dist.data.default_corpus import prepare_default_corpus

        prefixes = [Path(prepare_default_corpus(data["cache_dir"]))]  # existing cache: returns at once
    for prefix in prefixes:
        meta = prefix.with_name(prefix.name + ".meta.json")
        if meta.is_file():
            recorded = Path(json.loads(meta.read_text())["tokenizer"]["path"])
            path = recorded if recorded.is_absolute() else prefix.parent / recorded
            if path.is_file():
                return path
    return None


def sentencepiece_to_tokenizers(model_path: Path):
    """An HF `tokenizers` BPE equivalent of a SentencePiece BPE model trained like ours (identity normalisation,
    no dummy prefix, byte fallback): the same ids for any text, except that the literal text of a control
    piece (e.g. "<|endoftext|>") becomes that special token, as HF tokenizers do."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor
    from transformers.tokenization_utils_base import generate_merges

    proto = SentencePieceExtractor(str(model_path)).proto
    if proto.trainer_spec.model_type != 2:  # 2 = BPE
        raise CheckpointError(f"{model_path}: only SentencePiece BPE models are converted")
    if proto.normalizer_spec.add_dummy_prefix or proto.normalizer_spec.precompiled_charsmap:
        raise CheckpointError(f"{model_path}: SentencePiece normalisation other than identity is not converted")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=proto.trainer_spec.unk_piece,
            fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = [p.piece for p in proto.pieces if p.type in (2, 3)]  # unknown, control
    tokenizer.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    return tokenizer


def _copy_hf_tokenizer(source: Path, out: Path) -> bool:
    """Copy the HF tokenizer files of `source` into `out` when it has a tokenizer; whether it had one."""
    found = [name for name in HF_TOKENIZER_FILES if (source / name).is_file()]
    if not {"tokenizer.json", "tokenizer.model"} & set(found):
        return False
    out.mkdir(exist_ok=True)
    for name in found:
        shutil.copy2(source / name, out / name)
    return True


def _export_tokenizer(source: WeightSource, out: Path) -> dict | None:
    """tokenizer.json + tokenizer_config.json (generic PreTrainedTokenizerFast) when the tokenizer is known."""
    path = run_tokenizer_file(source.run_config)
    if path is None:
        carried = source.path if source.checkpoint is None else source.checkpoint_dir / IMPORTED_TOKENIZER_DIR
        if not _copy_hf_tokenizer(carried, out) and "data" in source.run_config:
            warnings.warn("the run's tokenizer was not found (data.tokenizer / data cache): exporting the model "
                          "without tokenizer files", stacklevel=3)
        return None
    from l2e_dist.data.tokenizer import TextTokenizer

    text_tokenizer = TextTokenizer(str(path), eod_token=(source.run_config.get("data") or {}).get("eod_token"))
    if path.suffix == ".json":
        shutil.copy2(path, out / "tokenizer.json")
        unk = None
    else:
        converted = sentencepiece_to_tokenizers(path)
        converted.save(str(out / "tokenizer.json"))
        unk = converted.id_to_token(0)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text_tokenizer.eod_token,
        "eos_token": text_tokenizer.eod_token,
        "model_max_length": source.model_config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if unk is not None:
        config["unk_token"] = unk
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"eos_id": text_tokenizer.eod_id}


# ------------------------------------------------------------------------------------------- import
def import_hf(hf_dir: str | Path, out_dir: str | Path, tp: int) -> Path:
    """A GPTNeoX/Pythia HF directory -> our checkpoint directory with TP=`tp` weight shards (DeepSpeed
    stage-0 layout: mp_rank_XX_model_states.pt, no optimizer state) that `train.init_from` starts from."""
    _check_hf_import_source(Path(hf_dir))
    source = WeightSource(hf_dir)
    cfg = source.model_config
    if cfg.num_attention_heads % tp or cfg.ffn_size % tp:
        raise CheckpointError(f"TP={tp} must divide the heads ({cfg.num_attention_heads}) and MLP width ({cfg.ffn_size})")
    rows = cfg.padded_vocab_size(tp)
    out_dir, tmp = _atomic_directory(Path(out_dir))
    try:
        weights = {name: resize_vocab_rows(name, source.tensor(name), rows, cfg.vocab_size) for name in source.names}
        run_config = {"model": {f.name: getattr(cfg, f.name) for f in fields(cfg)}}
        for rank in range(tp):
            state = {
                "module": {name: split_tensor(name, w, tp, rank) for name, w in weights.items()},
                "mp_world_size": tp,
                "dp_world_size": 1,
                "step": 0,
                "config": run_config,
                "hf_token_ids": source.token_ids,
                "hf_hidden_act": source.hf_hidden_act,
                "format": IMPORT_FORMAT,
            }
            torch.save(state, tmp / f"mp_rank_{rank:02d}_model_states.pt")
        _copy_hf_tokenizer(source.path, tmp / IMPORTED_TOKENIZER_DIR)
        write_manifest(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_hf_import_source(path: Path) -> None:
    """One line for a directory `from-hf` cannot import (before any checkpoint lookup, whose messages are
    about the other direction)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path} is not a Hugging Face model directory (no config.json): give a GPTNeoX/Pythia directory with "
            "config.json and model.safetensors (a training checkpoint needs no import: use train.init_from)"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_file} is not valid JSON ({exc}): re-download the model") from None
    if model_type != "gpt_neox":
        raise CheckpointError(
            f"{path} holds a {model_type!r} model: only GPTNeoX/Pythia (model_type 'gpt_neox') can be imported"
        )
    if not is_hf_directory(path):
        raise CheckpointError(
            f"{path} has a config.json but no weights ({', '.join(HF_WEIGHT_FILES)}): copy the weight files there"
        )


def load_init_weights(model: torch.nn.Module, path: str | Path, tp_rank: int, tp_size: int) -> None:
    """`train.init_from`: copy the weights of a checkpoint or HF directory into this TP rank's (not yet
    DeepSpeed-wrapped) model; the optimizer starts fresh. The architectures must match. A gpt-neox directory:
    its layer files' weights (training.neox_branch then continues its optimizer)."""
    if is_neox_native(path):
        load_neox_weights(model, path, tp_rank, tp_size)
        return
    source = WeightSource(path)
    ours = model.cfg
    mismatch = architecture_mismatch(source.model_config, ours, source.pythia_gelu_label)
    if mismatch:
        raise CheckpointError(f"train.init_from={path} has another architecture ({mismatch}): use its model config")
    note = pythia_gelu_note(source.model_config, ours, source.pythia_gelu_label, path)
    if note and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(note, file=sys.stderr, flush=True)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(source.names))
    if missing:
        raise CheckpointError(f"train.init_from={path} lacks {missing[:3]}...: not a GPTNeoX checkpoint of this model")
    with torch.no_grad():
        for name, param in params.items():
            local = source.tp_shard(name, model.padded_vocab_size, ours.vocab_size or 0, tp_size, tp_rank)
            if local.shape != param.shape:
                raise CheckpointError(f"train.init_from={path}: {name} has shape {tuple(local.shape)} on TP rank "
                                      f"{tp_rank}, the model expects {tuple(param.shape)}")
            param.copy_(local)

