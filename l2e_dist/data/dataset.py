"""Training-side datasets: split, pack and blend Megatron .bin/.idx files without torch.distributed.

* Split: the documents of each file are divided contiguously by `data.split` (Megatron's rounding).
* Pack (GPT-NeoX/Megatron style): within a split, documents are shuffled by the seed, concatenated, and cut
  into samples of seq_length + 1 tokens; sample i covers tokens [i*seq, i*seq + seq + 1) of that stream, so
  consecutive samples overlap by one token (the label of the last position). The tail that does not fill a
  sample is dropped (at most seq_length tokens per split). One pass over the split = one epoch.
* Blend: N = the sum of the parts' sample counts; part k contributes round(w_k * N) samples (repeating its
  own samples when up-weighted), spread evenly over the blended index.

* File order (`data.order: pythia`, Pythia's pre-shuffled files): sequence k of the file (there: document k)
  is sample k, read whole (every one must hold seq_length + 1 tokens); `split` cuts the samples contiguously,
  train first, so training keeps the file's order; the sampler reads global batch s as samples [s*G, (s+1)*G).
* Index-map order (`data.order: pythia_index_maps`, a PolyPythia seed): the same, with sample k read from an
  unshuffled corpus through GPT-NeoX's doc/sample/shuffle index maps (index_maps.py).

The packing order and the blend are pure functions of (file contents, split, seed, weights); they are cached as
.npy files under `data.cache_dir/index/` (atomic writes) and memory-mapped, so every rank shares them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from l2e_dist.config_utils import ConfigError
from l2e_dist.data.config import DataConfig, parse_split
from l2e_dist.data.index_maps import IndexMapDataset, checked_index_maps, locate_index_maps, resolve_data_seed
from l2e_dist.data.indexed import (
    DataFileError,
    check_index,
    open_indexed,
    read_labels,
    read_meta,
)
from l2e_dist.data.tokenizer import TextTokenizer
from l2e_dist.fileio import atomic_save_npy

INDEX_VERSION = 1  # bump when the packing/blending recipe changes
SPLIT_NAMES = ("train", "valid", "test")


def file_fingerprint(prefix: str) -> str:
    """Content fingerprint of a .bin/.idx pair: sizes plus the first and last MiB of the index (cheap, stable)."""
    digest = hashlib.sha256()
    idx_path = prefix + ".idx"
    size = os.path.getsize(idx_path)
    digest.update(f"{size} {os.path.getsize(prefix + '.bin')}".encode())
    with open(idx_path, "rb") as stream:
        digest.update(stream.read(1 << 20))
        stream.seek(max(0, size - (1 << 20)))
        digest.update(stream.read(1 << 20))
    return digest.hexdigest()[:20]


def split_boundaries(num_documents: int, fractions: tuple[float, ...]) -> list[int]:
    """Megatron's get_split_indices: rounded cumulative counts, the rounding error taken off the later splits."""
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(num_documents))))
    excess = bounds[-1] - num_documents
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def _cached(directory: str, name: str, compute) -> np.ndarray:
    """Load `directory/name.npy` memory-mapped, computing and saving it (atomically) first if missing."""
    path = os.path.join(directory, name + ".npy")
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        atomic_save_npy(path, compute())
    return np.load(path, mmap_mode="r")


class _IndexedFile(Dataset):
    """One .bin/.idx prefix opened lazily, with its per-document labels: pickles as paths, not memory maps
    (DataLoader workers reopen the files)."""

    prefix: str

    def _reset_file(self) -> None:
        self._indexed = None
        self._labels = None

    @property
    def indexed(self):
        if self._indexed is None:
            self._indexed = open_indexed(self.prefix)
        return self._indexed

    def _doc_labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = read_labels(self.prefix, len(self.indexed.document_indices) - 1)[0]
        return self._labels

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_indexed=None, _labels=None)
        return state


class PackedDataset(_IndexedFile):
    """Fixed-length samples packed across the (shuffled) documents of one split of one .bin/.idx prefix."""

    def __init__(self, prefix: str, doc_range: tuple[int, int], seq_length: int, shuffle_seed: list[int],
                 index_dir: str, label_map: np.ndarray | None):
        self.prefix, self.doc_range, self.seq_length = prefix, doc_range, seq_length
        self.shuffle_seed, self.index_dir = shuffle_seed, index_dir
        self.label_map = label_map  # local label id -> global feature id, or None (no labels)
        self._reset_file()
        self.order = _cached(index_dir, "order", self._compute_order)  # sequence ids in packing order
        # the token offset of each sequence in packing order, plus the total (cached as cum.npy)
        self.token_offsets = _cached(index_dir, "cum", self._compute_token_offsets)
        self.num_samples = max(0, (int(self.token_offsets[-1]) - 1) // seq_length)

    def _compute_order(self) -> np.ndarray:
        start, stop = self.doc_range
        doc_index = np.asarray(self.indexed.document_indices)
        docs = start + np.random.default_rng(np.random.SeedSequence(self.shuffle_seed)).permutation(stop - start)
        first, count = doc_index[docs], doc_index[docs + 1] - doc_index[docs]
        if (count == 1).all():
            return first.astype(np.int64)
        # documents made of several sequences: expand each document to its consecutive sequence ids
        offsets = np.repeat(first - (np.cumsum(count) - count), count)
        return (offsets + np.arange(int(count.sum()))).astype(np.int64)

    def _compute_token_offsets(self) -> np.ndarray:
        lengths = np.asarray(self.indexed.sequence_lengths)[self.order].astype(np.int64)
        return np.concatenate([[0], np.cumsum(lengths)])

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(order=None, token_offsets=None)  # memory-mapped index arrays: reloaded in __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.order = np.load(os.path.join(self.index_dir, "order.npy"), mmap_mode="r")
        self.token_offsets = np.load(os.path.join(self.index_dir, "cum.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        start, stop = i * self.seq_length, i * self.seq_length + self.seq_length + 1
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        feature_labels = np.full(self.seq_length + 1, -1, dtype=np.int64)
        packed = int(np.searchsorted(self.token_offsets, start, side="right")) - 1  # index into self.order
        pos = start
        doc_index = self.indexed.document_indices if self.label_map is not None else None
        while pos < stop:
            seq_id = int(self.order[packed])
            offset = pos - int(self.token_offsets[packed])
            length = min(int(self.token_offsets[packed + 1]) - pos, stop - pos)
            out = slice(pos - start, pos - start + length)
            tokens[out] = self.indexed.get(seq_id, offset=offset, length=length)
            if doc_index is not None:
                doc = int(np.searchsorted(doc_index, seq_id, side="right")) - 1
                local = int(self._doc_labels()[doc])
                feature_labels[out] = self.label_map[local] if local >= 0 else -1
            pos += length
            packed += 1
        return {"tokens": torch.from_numpy(tokens), "feature_labels": torch.from_numpy(feature_labels)}


class FileOrderDataset(_IndexedFile):
    """Samples that ARE the sequences [start, stop) of one file, in file order (Pythia's pre-shuffled layout:
    each sequence, one per document, is one 2049-token training sample, written in the order Pythia's training
    consumed them; Pythia's utils/batch_viewer.py slices the same sequences).

    `in_file_order` tells the sampler to read global batch s as samples [s*G, (s+1)*G) instead of shuffling.
    """

    in_file_order = True

    def __init__(self, prefix: str, sample_range: tuple[int, int], seq_length: int, index_dir: str,
                 label_map: np.ndarray | None):
        self.prefix, self.sample_range, self.seq_length = prefix, sample_range, seq_length
        self.index_dir, self.label_map = index_dir, label_map
        self.fingerprint = os.path.basename(index_dir)
        self._reset_file()
        sample_length = int(_cached(index_dir, "sample_length", self._common_length)[0])
        if sample_length != seq_length + 1:
            raise ConfigError(
                "train.seq_length",
                f"{seq_length} does not fit {prefix}: data.order=pythia reads each document as one sample and its "
                f"documents have {sample_length} tokens; set train.seq_length={sample_length - 1}",
            )
        self.num_samples = sample_range[1] - sample_range[0]

    def _common_length(self) -> np.ndarray:
        """[the length every sequence has]; a ConfigError when they differ (not Pythia's layout). O(sequences),
        once per file: the answer is cached under index_dir."""
        lengths = np.asarray(self.indexed.sequence_lengths)
        low, high = int(lengths.min()), int(lengths.max())
        if low != high:
            raise ConfigError(
                "data.order",
                f"pythia needs every document of {self.prefix} to be one sample of the same length, but they have "
                f"{low}..{high} tokens: this is not a pre-shuffled Pythia file; use data.order=packed",
            )
        return np.array([low], dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def _feature_label(self, sequence: int) -> int:
        """Feature-label id of the document holding `sequence` (-1: unlabelled)."""
        if self.label_map is None:
            return -1
        doc = int(np.searchsorted(self.indexed.document_indices, sequence, side="right")) - 1
        local = int(self._doc_labels()[doc])
        return int(self.label_map[local]) if local >= 0 else -1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        sequence = self.sample_range[0] + i
        tokens = torch.from_numpy(self.indexed.get(sequence).astype(np.int64))
        return {"tokens": tokens, "feature_labels": torch.full_like(tokens, self._feature_label(sequence))}


class BlendedDataset(Dataset):
    """Weighted interleaving of PackedDatasets (one split). `index_dir` holds the blend and sample-order files."""

    def __init__(self, parts: list[PackedDataset], weights: list[float], index_dir: str):
        self.parts, self.index_dir = parts, index_dir
        self.fingerprint = os.path.basename(index_dir)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.num_samples = int(sizes.sum())
        self.counts = _largest_remainder(np.asarray(weights, dtype=np.float64), self.num_samples)
        if len(parts) > 1:
            if not os.path.isfile(os.path.join(index_dir, "blend_sample.npy")):
                part_of, sample_of = _blend(self.counts)
                _cached(index_dir, "blend_part", lambda: part_of)
                _cached(index_dir, "blend_sample", lambda: sample_of)  # written last: marks a complete blend
            self._open_blend()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("part_of", None)
        state.pop("sample_of", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if len(self.parts) > 1:
            self._open_blend()

    def _open_blend(self) -> None:
        self.part_of = np.load(os.path.join(self.index_dir, "blend_part.npy"), mmap_mode="r")
        self.sample_of = np.load(os.path.join(self.index_dir, "blend_sample.npy"), mmap_mode="r")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        if len(self.parts) == 1:
            return self.parts[0][i]
        part = self.parts[int(self.part_of[i])]
        return part[int(self.sample_of[i]) % len(part)]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest-remainder rounding, stable ties)."""
    if total == 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def _blend(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spread part k's counts[k] samples evenly: sample j of part k sits at ideal time (j + 0.5) / counts[k]."""
    part = np.repeat(np.arange(len(counts), dtype=np.int16), counts)
    sample = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    times = (sample + 0.5) / np.maximum(counts, 1)[part]
    order = np.lexsort((part, times))
    return part[order], sample[order]


@dataclass
class Datasets:
    """What build_datasets returns; `feature_names[f]` names feature-label id f in the samples' "feature_labels"
    (per token: the label of its document, -1 when unlabelled)."""

    train: BlendedDataset | FileOrderDataset | IndexMapDataset
    valid: BlendedDataset | FileOrderDataset | IndexMapDataset
    test: BlendedDataset | FileOrderDataset | IndexMapDataset
    vocab_size: int
    eod_id: int
    tokenizer_path: str | None
    feature_names: list[str]
    data_seed: int | None = None  # the seed of a Pythia order (data.data_seed, or the index maps' names)


def _resolve_tokenizer(cfg: DataConfig, prefixes: list[str]) -> tuple[int, int, str | None]:
    """(vocab_size, eod_id, tokenizer path) from data.tokenizer, else from the prefixes' meta.json sidecars."""
    metas = {p: read_meta(p) for p in prefixes}
    if cfg.tokenizer:
        tokenizer = TextTokenizer(cfg.tokenizer, eod_token=cfg.eod_token, threads=False)
        for prefix, meta in metas.items():
            recorded = (meta or {}).get("tokenizer", {})
            if recorded and (recorded["vocab_size"], recorded["eod_id"]) != (tokenizer.vocab_size, tokenizer.eod_id):
                raise DataFileError(
                    f"{prefix} was tokenized with vocab_size={recorded['vocab_size']}, eod_id={recorded['eod_id']} "
                    f"but data.tokenizer has {tokenizer.vocab_size}, {tokenizer.eod_id}: use the same tokenizer"
                )
        return tokenizer.vocab_size, tokenizer.eod_id, tokenizer.path
    found = {}
    for prefix, meta in metas.items():
        if meta is None:
            raise DataFileError(
                f"{prefix} has no .meta.json (e.g. Pythia's published files): set data.tokenizer to the "
                "tokenizer.json it was made with"
            )
        recorded = meta["tokenizer"]
        path = recorded["path"]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(prefix), path)
        found[prefix] = (int(recorded["vocab_size"]), int(recorded["eod_id"]), path)
    if len({v[:2] for v in found.values()}) > 1:
        raise DataFileError(f"data.paths were tokenized with different tokenizers: {found}")
    return next(iter(found.values()))


def build_datasets(cfg: DataConfig, seq_length: int, seed: int) -> Datasets:
    """Train/valid/test datasets of `seq_length + 1`-token samples (see the module docstring)."""
    from l2e_dist.data.default_corpus import prepare_default_corpus

    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    prefixes = [os.path.abspath(p) for p in cfg.paths] or [prepare_default_corpus(cfg.cache_dir)]
    valid_prefixes = [os.path.abspath(p) for p in cfg.valid_paths]
    infos = [check_index(p) for p in prefixes]
    vocab_size, eod_id, tokenizer_path = _resolve_tokenizer(cfg, prefixes + valid_prefixes)
    fractions = parse_split(cfg.split)
    fingerprints = [file_fingerprint(p) for p in prefixes]
    sidecars = [read_labels(p, info.num_documents) if cfg.labels else None for p, info in zip(prefixes, infos)]
    feature_names = sorted({name for sidecar in sidecars if sidecar is not None for name in sidecar[1]})
    label_maps = [None if sidecar is None
                  else np.array([feature_names.index(name) for name in sidecar[1]], dtype=np.int64)
                  for sidecar in sidecars]
    index_root = os.path.join(os.path.abspath(cfg.cache_dir), "index")
    data_seed = cfg.data_seed
    if cfg.order == "pythia_index_maps":  # a PolyPythia seed's order (index_maps.py)
        maps_files = locate_index_maps(cfg.index_maps, cfg.data_seed)
        data_seed = resolve_data_seed(maps_files, cfg.data_seed)
        maps = checked_index_maps(maps_files, prefixes[0], fingerprints[0], seq_length, index_root)
    splits: list = []
    for split_id, split_name in enumerate(SPLIT_NAMES):
        if split_name == "valid" and valid_prefixes:
            splits.append(_whole_files_packed(valid_prefixes, seq_length, seed, index_root))
            continue
        if cfg.order == "pythia_index_maps":
            bounds = split_boundaries(maps.num_samples, fractions)
            splits.append(IndexMapDataset(prefixes[0], maps_files, (bounds[split_id], bounds[split_id + 1]),
                                          seq_length, label_maps[0], _key(INDEX_VERSION, maps_files.prefix,
                                                                          fingerprints[0], split_id)))
            continue
        if cfg.order == "pythia":
            bounds = split_boundaries(infos[0].num_sequences, fractions)
            sample_range = (bounds[split_id], bounds[split_id + 1])
            layout_dir = os.path.join(index_root, _key(INDEX_VERSION, "file-order", fingerprints[0]))
            splits.append(FileOrderDataset(prefixes[0], sample_range, seq_length, layout_dir, label_maps[0]))
            continue
        parts = []
        for prefix, info, fp, label_map in zip(prefixes, infos, fingerprints, label_maps):
            bounds = split_boundaries(info.num_documents, fractions)
            doc_range = (bounds[split_id], bounds[split_id + 1])
            key = _key(INDEX_VERSION, fp, doc_range, seed, split_id)
            shuffle_seed = [seed, split_id, int(fp[:15], 16)]
            parts.append(PackedDataset(prefix, doc_range, seq_length, shuffle_seed, os.path.join(index_root, key),
                                       label_map))
        if split_name == "train" and len(parts) > 1:
            for part in parts:
                if len(part) == 0:
                    raise DataFileError(f"{part.prefix} has no training sample of {seq_length + 1} tokens: drop it "
                                        "from data.paths or give it a larger train share in data.split")
        # without weights every part contributes each of its samples once; empty parts drop out of a split
        weights = list(cfg.weights) if cfg.weights is not None else [float(len(p)) for p in parts]
        splits.append(_blend_parts(parts, weights, seq_length, index_root))
    return Datasets(*splits, vocab_size=vocab_size, eod_id=eod_id, tokenizer_path=tokenizer_path,
                    feature_names=feature_names, data_seed=data_seed)


def _blend_parts(parts: list[PackedDataset], weights: list[float], seq_length: int,
                 index_root: str) -> BlendedDataset:
    """One split's blend; parts without samples drop out (unless all are empty)."""
    kept = [k for k, part in enumerate(parts) if len(part) > 0] or list(range(len(parts)))
    parts, weights = [parts[k] for k in kept], [weights[k] for k in kept]
    blend_key = _key(INDEX_VERSION, [os.path.basename(p.index_dir) for p in parts], weights, seq_length)
    return BlendedDataset(parts, weights, os.path.join(index_root, blend_key))


def _whole_files_packed(prefixes: list[str], seq_length: int, seed: int, index_root: str) -> BlendedDataset:
    """data.valid_paths: every document of each file, packed, blended by size (no feature labels)."""
    parts = []
    for prefix in prefixes:
        info, fp = check_index(prefix), file_fingerprint(prefix)
        doc_range = (0, info.num_documents)
        key = _key(INDEX_VERSION, fp, doc_range, seed, "valid_paths")
        parts.append(PackedDataset(prefix, doc_range, seq_length, [seed, 1, int(fp[:15], 16)],
                                   os.path.join(index_root, key), None))
    return _blend_parts(parts, [float(len(p)) for p in parts], seq_length, index_root)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]
