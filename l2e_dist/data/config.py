"""The `data:` section of the run config (see configs/data/*.yaml)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from l2e_dist.config_utils import ConfigError


def parse_split(split: str) -> tuple[float, float, float]:
    """'969,30,1' -> normalised (train, valid, test) fractions; raises ConfigError('split', ...)."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(
            "split", f"expected three non-negative numbers 'train,valid,test' (e.g. '969,30,1'), got {split!r}"
        )
    total = sum(values)
    return values[0] / total, values[1] / total, values[2] / total


@dataclass
class DataConfig:
    """Where the tokens come from and how they are split, blended and labelled.

    `split` divides the DOCUMENTS of every dataset (contiguously, in file order, as Megatron does) into
    train/valid/test; samples are then packed within each split, so no document is shared by two splits.
    """

    # Megatron .bin/.idx prefixes (no extension); empty -> the bundled default corpus (stdlib docstrings).
    paths: list[str] = field(default_factory=list)
    # Blending weights, one per path (normalised); None -> proportional to each dataset's size.
    weights: list[float] | None = None
    split: str = "969,30,1"  # train,valid,test shares of the documents (normalised)
    # tokenizer.json (HF) or SentencePiece .model. None -> taken from the `<prefix>.meta.json` written by
    # l2e-prepare-data (or the built tokenizer of the default corpus). Needed for Pythia's published files.
    tokenizer: str | None = None
    # End-of-document token of an HF tokenizer when it is not one of the usual names (<|endoftext|>, </s>, ...).
    eod_token: str | None = None
    # Default corpus, packing/blending index files and sample-order files live here.
    cache_dir: str = ".cache/l2e-data"
    # Load per-document feature labels (`<prefix>.labels.npy/json`) when present, for FKR.
    labels: bool = True
    # packed: documents shuffled by train.seed, concatenated and cut into seq_length + 1 token samples, batches
    #   drawn from a seeded per-epoch permutation (GPT-NeoX/Megatron style).
    # pythia: Pythia's pre-shuffled files (one path): sequence k (there: document k) IS sample k (seq_length + 1
    #   tokens, read whole), global batch i = samples [i*G, (i+1)*G) in file order, no shuffle, no packing, no
    #   wrap-around; `split` cuts the samples contiguously (train first, so training keeps the file's order;
    #   valid = the held-out range after it) unless valid_paths is given.
    # pythia_index_maps: a PolyPythia seed's order (docs/polypythia.md): the ONE unshuffled path read through the
    #   GPT-NeoX index maps named by `index_maps` (doc/sample/shuffle_idx .npy, memory-mapped): sample k =
    #   GPT-NeoX GPT2Dataset[k]; then as pythia (file order, contiguous split, batch i = samples [i*G, (i+1)*G)).
    order: Literal["packed", "pythia", "pythia_index_maps"] = "packed"
    # data.order=pythia / pythia_index_maps: the global batch the order was cut for (Pythia: 1024);
    # train.global_batch_size must equal it. None: not checked.
    order_batch_size: int | None = None
    # data.order=pythia_index_maps: a folder holding the maps (`*_indexmap_<N>ns_<L>sl_<seed>s_doc_idx.npy`,
    # `..._sample_idx.npy`, `..._shuffle_idx.npy`), or their common prefix (up to `..._<seed>s`).
    index_maps: str | None = None
    # The seed the data order was drawn with (GPT-NeoX `seed`; Pythia's standard order: 1234, PolyPythia seedN: N).
    # pythia_index_maps: taken from the maps' names when null, refused when they say another. pythia: a label of
    # the pre-shuffled file's order. Recorded in checkpoints; a branch or resume across data seeds is refused.
    data_seed: int | None = None
    # Validation from separate .bin/.idx prefixes (e.g. the Pile's validation set from l2e-prepare-data), packed
    # (all their documents); `split` must then give valid a share of 0.
    valid_paths: list[str] = field(default_factory=list)

    def validate(self) -> None:
        parse_split(self.split)
        if self.weights is not None:
            if not self.paths:
                raise ConfigError("weights", "weights need data.paths (the default corpus is a single dataset)")
            if len(self.weights) != len(self.paths):
                raise ConfigError(
                    "weights", f"got {len(self.weights)} weights for {len(self.paths)} paths: give one per path"
                )
            if any(not math.isfinite(w) or w <= 0 for w in self.weights):
                raise ConfigError("weights", f"weights must be positive numbers, got {self.weights}")
        for i, path in enumerate(self.paths):
            if not path:
                raise ConfigError(f"paths[{i}]", "empty path")
            if path.endswith((".bin", ".idx")):
                raise ConfigError(
                    f"paths[{i}]", f"give the prefix without extension, e.g. {path[:-4]!r} instead of {path!r}"
                )
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError("paths", "a path is listed twice: use weights to up-sample a dataset instead")
        if not self.cache_dir:
            raise ConfigError("cache_dir", "must not be empty")
        for i, path in enumerate(self.valid_paths):
            if not path or path.endswith((".bin", ".idx")):
                raise ConfigError(f"valid_paths[{i}]", f"give a .bin/.idx prefix without extension, got {path!r}")
        if self.valid_paths and parse_split(self.split)[1] > 0:
            raise ConfigError("split", f"{self.split!r} gives validation a share, but validation comes from "
                              "data.valid_paths: give valid 0, e.g. '1,0,0'")
        if self.order == "pythia":
            if len(self.paths) != 1:
                raise ConfigError("paths", f"data.order=pythia reads ONE pre-shuffled file (its order is the "
                                  f"training order), got {len(self.paths)} paths: give exactly one prefix")
            if self.weights is not None:
                raise ConfigError("weights", "data.order=pythia does not blend: remove data.weights")
        self._validate_index_maps()
        if self.order_batch_size is not None and self.order_batch_size < 1:
            raise ConfigError("order_batch_size", f"must be >= 1 or null, got {self.order_batch_size}")

    def _validate_index_maps(self) -> None:
        """data.order=pythia_index_maps reads one unshuffled corpus through one seed's maps."""
        if self.data_seed is not None and (isinstance(self.data_seed, bool) or self.data_seed < 0):
            raise ConfigError("data_seed", f"must be a non-negative integer (GPT-NeoX's seed) or null, "
                              f"got {self.data_seed!r}")
        if self.data_seed is not None and self.order == "packed":
            raise ConfigError("data_seed", "names the seed of a Pythia order (data.order=pythia or "
                              "pythia_index_maps); the packed order is drawn from train.seed: remove data.data_seed")
        if self.order != "pythia_index_maps":
            if self.index_maps is not None:
                raise ConfigError("index_maps", f"is read only with data.order=pythia_index_maps (order is "
                                  f"{self.order!r}): set data.order=pythia_index_maps or remove data.index_maps")
            return
        if not self.index_maps:
            raise ConfigError("index_maps", "data.order=pythia_index_maps needs the seed's index maps: set "
                              "data.index_maps to their folder or their common file prefix")
        if len(self.paths) != 1:
            raise ConfigError("paths", f"data.order=pythia_index_maps reads ONE unshuffled corpus through the maps, "
                              f"got {len(self.paths)} paths: give the prefix the maps were built on")
        if self.weights is not None:
            raise ConfigError("weights", "data.order=pythia_index_maps does not blend: remove data.weights")
