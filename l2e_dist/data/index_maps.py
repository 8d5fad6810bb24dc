"""PolyPythia data orders (`data.order: pythia_index_maps`): an unshuffled corpus read through GPT-NeoX index maps.

Every Pythia model's data order is GPT-NeoX's GPT2Dataset over the unshuffled Pile `.bin/.idx`, drawn by its
`seed` (gpt-neox d36f623 megatron/data/gpt2_dataset.py). Three maps fix it:
  doc_idx     int32 [D]       the training documents (sequence ids of the .idx), repeated per epoch, shuffled
  sample_idx  int32 [S+1, 2]  (position in doc_idx, token offset) where sample j starts; sample j ends at row j+1,
                              INCLUSIVE: consecutive samples share one token, each has seq_length + 1 tokens
  shuffle_idx uint32 [S]      training sample k is packed sample shuffle_idx[k]
GPT-NeoX names them `<prefix>_<split>_indexmap_<N>ns_<L>sl_<seed>s_{doc,sample,shuffle}_idx.npy`;
EleutherAI/pile-preshuffled-seeds publishes them per PolyPythia seed. They are memory-mapped (no per-seed copy of
the corpus), checked once against the corpus (every reference inside it, every sample seq_length + 1 tokens; the
verdict is cached) and read as GPT2Dataset.__getitem__ reads them. Training sample k is then what Pythia's
pre-shuffled file holds as document k (`data.order: pythia`), and the sampler reads them in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from l2e_dist.data.indexed import DataFileError, open_indexed, read_labels
from l2e_dist.fileio import atomic_write_json

MAP_KINDS = ("doc", "sample", "shuffle")
# `..._indexmap_147164160ns_2048sl_1234s` (the common prefix of the three files)
MAP_NAME = re.compile(r"_indexmap_(?P<ns>\d+)ns_(?P<sl>\d+)sl_(?P<seed>\d+)s$")
CHECK_BLOCK = 1 << 24  # map entries per block of the one-off consistency check
CHECK_VERSION = 1


class IndexMapError(DataFileError):
    """Index maps that are missing, malformed or built for another corpus / sequence length / seed."""


@dataclass(frozen=True)
class IndexMapFiles:
    """The three map files of one seed and what their GPT-NeoX name says (None: the name does not say)."""

    prefix: str
    named_samples: int | None = None
    named_seq_length: int | None = None
    named_seed: int | None = None

    def path(self, kind: str) -> str:
        return f"{self.prefix}_{kind}_idx.npy"


def _files_of(prefix: str) -> IndexMapFiles:
    match = MAP_NAME.search(os.path.basename(prefix))
    if match is None:
        return IndexMapFiles(prefix)
    return IndexMapFiles(prefix, int(match["ns"]), int(match["sl"]), int(match["seed"]))


def locate_index_maps(location: str, data_seed: int | None) -> IndexMapFiles:
    """`data.index_maps` -> the three files: a folder holding one seed's maps (or several: data.data_seed picks),
    their common prefix, or the path of one of them."""
    location = os.path.abspath(location)
    for kind in MAP_KINDS:
        if location.endswith(f"_{kind}_idx.npy"):
            location = location[: -len(f"_{kind}_idx.npy")]
    if os.path.isdir(location):
        prefixes = sorted(os.path.join(location, name[: -len("_doc_idx.npy")]) for name in os.listdir(location)
                          if name.endswith("_doc_idx.npy"))
        found = [_files_of(p) for p in prefixes]
        if data_seed is not None:
            seeds = sorted({f.named_seed for f in found if f.named_seed is not None})
            found = [f for f in found if f.named_seed in (None, data_seed)]
            if not found and seeds:
                raise IndexMapError(f"{location} holds the index maps of seed(s) {seeds}, not of data.data_seed "
                                    f"{data_seed}: point data.index_maps at seed {data_seed}'s maps or set "
                                    f"data.data_seed to the seed of these")
        if not found:
            seeded = f" for data seed {data_seed} ('..._{data_seed}s_doc_idx.npy')" if data_seed is not None else ""
            raise IndexMapError(f"{location} holds no index maps{seeded} (no *_doc_idx.npy): point data.index_maps "
                                "at the folder of the seed's three maps (e.g. pile-preshuffled-seeds/seedN)")
        if len(found) > 1:
            names = ", ".join(os.path.basename(f.prefix) for f in found)
            raise IndexMapError(f"{location} holds several index maps ({names}): set data.data_seed, or point "
                                "data.index_maps at one map's prefix")
        files = found[0]
    else:
        files = _files_of(location)
    for kind in MAP_KINDS:
        if not os.path.isfile(files.path(kind)):
            raise IndexMapError(f"{files.path(kind)} not found: data.index_maps needs the seed's doc_idx, sample_idx "
                                "and shuffle_idx .npy side by side (download all three)")
    return files


@dataclass
class IndexMaps:
    """The three maps, memory-mapped, of one seed."""

    files: IndexMapFiles
    doc: np.ndarray
    sample: np.ndarray
    shuffle: np.ndarray

    @property
    def num_samples(self) -> int:
        """GPT2Dataset.__len__: min(len(shuffle_idx) - 1, len(sample_idx) - 1)."""
        return max(0, min(self.shuffle.shape[0] - 1, self.sample.shape[0] - 1))


def _load(files: IndexMapFiles, kind: str, kinds: tuple[str, ...], ndim: int) -> np.ndarray:
    path = files.path(kind)
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise IndexMapError(f"cannot read {path} ({exc}): download it again") from None
    if array.dtype.kind not in kinds or array.ndim != ndim or (ndim == 2 and array.shape[1] != 2):
        want = {"doc": "a 1-D int32 array", "sample": "an int32 [S+1, 2] array", "shuffle": "a 1-D uint32 array"}
        raise IndexMapError(f"{path} holds a {array.dtype} array of shape {array.shape}, not {want[kind]} "
                            f"({kind}_idx of GPT-NeoX's index maps): download the right file")
    if array.shape[0] == 0 or (kind == "sample" and array.shape[0] < 2):
        raise IndexMapError(f"{path} is empty: download it again")
    return array


def open_index_maps(files: IndexMapFiles) -> IndexMaps:
    return IndexMaps(files, _load(files, "doc", ("i",), 1), _load(files, "sample", ("i",), 2),
                     _load(files, "shuffle", ("u", "i"), 1))


def resolve_data_seed(files: IndexMapFiles, data_seed: int | None) -> int | None:
    """The run's data seed: data.data_seed, or the one the maps' names carry; refused when they disagree."""
    if data_seed is not None and files.named_seed is not None and data_seed != files.named_seed:
        raise IndexMapError(f"{files.path('doc')} was built with seed {files.named_seed} (its name's "
                            f"'{files.named_seed}s') but data.data_seed is {data_seed}: point data.index_maps at "
                            f"seed {data_seed}'s maps or set data.data_seed={files.named_seed}")
    return data_seed if data_seed is not None else files.named_seed


def check_index_maps(maps: IndexMaps, prefix: str, seq_length: int) -> None:
    """Refuse maps that do not fit `prefix`'s corpus or `seq_length`, in one line naming the file: O(map size),
    in blocks (see `checked_index_maps` for the cached verdict)."""
    files = maps.files
    if files.named_seq_length is not None and files.named_seq_length != seq_length:
        raise IndexMapError(f"{files.path('sample')} was built for seq_length {files.named_seq_length} (its name's "
                            f"'{files.named_seq_length}sl') but train.seq_length is {seq_length}: set "
                            f"train.seq_length={files.named_seq_length}")
    indexed = open_indexed(prefix)  # referenced until the end: `sizes` is a view of its memory map
    sizes = indexed.sequence_lengths
    num_sequences = sizes.shape[0]
    doc, sample, shuffle = maps.doc, maps.sample, maps.shuffle
    another = ("these index maps were built on another corpus: point data.paths at the unshuffled .bin/.idx they "
               "were built on (Pythia: EleutherAI/pythia_pile_idxmaps) or rebuild the maps")
    for begin in range(0, doc.shape[0], CHECK_BLOCK):  # doc_idx: every entry a sequence of the corpus
        block = np.asarray(doc[begin : begin + CHECK_BLOCK], dtype=np.int64)
        low, high = int(block.min()), int(block.max())
        if low < 0 or high >= num_sequences:
            raise IndexMapError(f"{files.path('doc')} references document {low if low < 0 else high} but "
                                f"{prefix}.idx holds {num_sequences}: {another}")
    # sample_idx: rows in order inside doc_idx, offsets inside their document, every sample seq_length + 1 tokens.
    # Stream positions are summed block by block from `cursor` (starts[cursor] == base): no [D]-sized array.
    cursor, base, previous_end = 0, 0, None
    for begin in range(0, sample.shape[0], CHECK_BLOCK):
        rows = np.asarray(sample[begin : begin + CHECK_BLOCK], dtype=np.int64)
        where, offset = rows[:, 0], rows[:, 1]
        outside = np.flatnonzero((where < cursor) | (where >= doc.shape[0]) | (np.diff(where, prepend=cursor) < 0))
        if outside.size:
            j = begin + int(outside[0])
            raise IndexMapError(f"{files.path('sample')} row {j} points at doc_idx entry {int(where[outside[0]])}, "
                                f"out of order or past the {doc.shape[0]} entries of {files.path('doc')}: the maps are "
                                "of different seeds or builds; download them again")
        spanned = sizes[np.asarray(doc[cursor : int(where.max()) + 1], dtype=np.int64)].astype(np.int64)
        local = np.concatenate([[0], np.cumsum(spanned)])  # local[t] = start of doc_idx entry cursor + t, - base
        length = spanned[where - cursor]
        past = np.flatnonzero((offset < 0) | ((offset >= length) & ((offset > 0) | (length > 0))))
        if past.size:
            j, k = begin + int(past[0]), int(past[0])
            raise IndexMapError(f"{files.path('sample')} row {j} points at token {int(offset[k])} of document "
                                f"{int(doc[int(where[k])])}, which has {int(length[k])} tokens in {prefix}: {another}")
        ends = base + local[where - cursor] + offset  # stream position of each row's token
        steps = np.diff(ends, prepend=ends[0] - seq_length if previous_end is None else previous_end)
        wrong = np.flatnonzero(steps != seq_length)
        if wrong.size:
            j = begin + int(wrong[0]) - 1
            raise IndexMapError(f"{files.path('sample')}: sample {j} has {int(steps[wrong[0]]) + 1} tokens, not "
                                f"train.seq_length + 1 = {seq_length + 1}: set train.seq_length to the maps' (Pythia: "
                                "2048) or use maps built for it")
        previous_end = int(ends[-1])
        base += int(local[int(where[-1]) - cursor])
        cursor = int(where[-1])
    for begin in range(0, shuffle.shape[0], CHECK_BLOCK):
        block = np.asarray(shuffle[begin : begin + CHECK_BLOCK], dtype=np.int64)
        if int(block.min()) < 0 or int(block.max()) >= sample.shape[0] - 1:
            raise IndexMapError(f"{files.path('shuffle')} holds sample {int(block.max())} but "
                                f"{files.path('sample')} describes {sample.shape[0] - 1}: the maps are of different "
                                "seeds or builds; download all three again")
    del indexed


def _map_fingerprint(files: IndexMapFiles) -> list:
    stats = [os.stat(files.path(kind)) for kind in MAP_KINDS]
    return [files.prefix, [(s.st_size, s.st_mtime_ns) for s in stats]]


def checked_index_maps(files: IndexMapFiles, prefix: str, corpus_fingerprint: str, seq_length: int,
                       index_root: str) -> IndexMaps:
    """open_index_maps + check_index_maps, the check done once per (maps, corpus, seq_length): a passed check
    leaves a marker under `index_root` (the Pile's maps take a while to read through)."""
    maps = open_index_maps(files)
    key = hashlib.sha256(json.dumps([CHECK_VERSION, _map_fingerprint(files), corpus_fingerprint, seq_length],
                                    default=str).encode()).hexdigest()[:20]
    marker = os.path.join(index_root, "index-maps", key + ".json")
    if not os.path.isfile(marker):
        check_index_maps(maps, prefix, seq_length)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        atomic_write_json(marker, {"maps": files.prefix, "corpus": prefix, "seq_length": seq_length,
                                   "samples": maps.num_samples})
    return maps


class IndexMapDataset(Dataset):
    """Training samples [start, stop) of one seed's order: sample i = GPT2Dataset[start + i] over `prefix`.

    `in_file_order` tells the sampler to read global batch s as samples [s*G, (s+1)*G), as for Pythia's
    pre-shuffled file. Pickles as paths (DataLoader workers reopen the memory maps).
    """

    in_file_order = True

    def __init__(self, prefix: str, files: IndexMapFiles, sample_range: tuple[int, int], seq_length: int,
                 label_map: np.ndarray | None, fingerprint: str):
        self.prefix, self.files, self.sample_range = prefix, files, sample_range
        self.seq_length, self.label_map, self.fingerprint = seq_length, label_map, fingerprint
        self.num_samples = sample_range[1] - sample_range[0]
        self._reset()

    def _reset(self) -> None:
        self._indexed = self._maps = self._labels = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_indexed=None, _maps=None, _labels=None)
        return state

    @property
    def maps(self) -> IndexMaps:
        if self._maps is None:
            self._maps = open_index_maps(self.files)
        return self._maps

    @property
    def indexed(self):
        if self._indexed is None:
            self._indexed = open_indexed(self.prefix)
        return self._indexed

    def __len__(self) -> int:
        return self.num_samples

    def segments(self, i: int) -> list[tuple[int, int, int | None]]:
        """(sequence id, offset, length or None = to its end) of the pieces of sample i, in order
        (gpt2_dataset.py GPT2Dataset.__getitem__)."""
        maps = self.maps
        j = int(maps.shuffle[self.sample_range[0] + i])
        first, first_offset = (int(v) for v in maps.sample[j])
        last, last_offset = (int(v) for v in maps.sample[j + 1])
        if first == last:
            return [(int(maps.doc[first]), first_offset, last_offset - first_offset + 1)]
        middle = [(int(maps.doc[d]), 0, None) for d in range(first + 1, last)]
        return [(int(maps.doc[first]), first_offset, None), *middle, (int(maps.doc[last]), 0, last_offset + 1)]

    def _feature_label(self, sequence: int) -> int:
        if self.label_map is None:
            return -1
        if self._labels is None:
            self._labels = read_labels(self.prefix, len(self.indexed.document_indices) - 1)[0]
        doc = int(np.searchsorted(self.indexed.document_indices, sequence, side="right")) - 1
        local = int(self._labels[doc])
        return int(self.label_map[local]) if local >= 0 else -1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        pieces, feature_labels = [], []
        for sequence, offset, length in self.segments(i):
            piece = self.indexed.get(sequence, offset=offset, length=length)
            pieces.append(piece)
            feature_labels.append(np.full(len(piece), self._feature_label(sequence), dtype=np.int64))
        tokens = np.concatenate(pieces).astype(np.int64)
        if tokens.shape[0] != self.seq_length + 1:  # check_index_maps rules this out; a guard against edits
            raise IndexMapError(f"{self.files.path('sample')}: sample {i} has {tokens.shape[0]} tokens, not "
                                f"{self.seq_length + 1}: the maps do not fit {self.prefix}; rebuild or re-download them")
        return {"tokens": torch.from_numpy(tokens), "feature_labels": torch.from_numpy(np.concatenate(feature_labels))}
