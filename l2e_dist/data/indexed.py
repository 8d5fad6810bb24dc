"""Megatron/GPT-NeoX `.bin/.idx` files: checked opening, label/meta sidecars, atomic file helpers.

Layout of `<prefix>.idx` (megatron-core `_IndexWriter`, identical to GPT-NeoX's MMapIndexedDataset, which is
what Pythia's published Pile files use): magic `MMIDIDX\\0\\0`, u64 version 1, u8 dtype code, u64 sequence count
n, u64 document count d (= documents + 1), then int32 lengths[n], int64 byte pointers[n], int64 document
indices[d]. megatron-core reads these files with bare `assert`s; `check_index` turns every way a file can be
damaged into one clear `DataFileError` first.

Sidecars written by l2e-prepare-data next to the prefix:
  `<prefix>.labels.npy`  int32 per document: index into `names` of its feature label (-1 = unknown)
  `<prefix>.labels.json` {"field": "meta.pile_set_name", "names": [...]}
  `<prefix>.meta.json`   tokenizer, dtype, counts, skip counts (written last: marks a finished dataset)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from l2e_dist.errors import UserError
from l2e_dist.fileio import atomic_save_npy, atomic_write_json

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
# megatron.core.datasets.indexed_dataset.DType codes (uint16 = 8 as in GPT-NeoX).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
TOKEN_DTYPES = {"uint16": np.uint16, "int32": np.int32}
# GPT-NeoX and megatron-core pick uint16 below this vocabulary size (DType.optimal_dtype).
UINT16_VOCAB_LIMIT = 65500


class DataFileError(UserError, ValueError):
    """A missing, truncated or inconsistent data file (one line: what is wrong and what to do)."""


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> type[np.integer]:
    """uint16 when every token id fits (as GPT-NeoX/megatron choose), else int32; `requested` forces one."""
    if requested == "auto":
        return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32
    dtype = TOKEN_DTYPES[requested]
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise DataFileError(
            f"vocabulary of {vocab_size} tokens does not fit {requested} (max id {np.iinfo(dtype).max}): "
            "use --dtype int32 or --dtype auto"
        )
    return dtype


@dataclass(frozen=True)
class IndexInfo:
    """Header facts of one `.idx` file, checked against the file sizes."""

    prefix: str
    dtype: type[np.integer]
    num_sequences: int
    num_documents: int
    num_tokens: int


def check_index(prefix: str, deep: bool = False) -> IndexInfo:
    """Validate `<prefix>.idx` against `<prefix>.bin` in O(1) (header, sizes, last pointer).

    `deep=True` also checks every pointer against the lengths and that document indices are non-decreasing
    (O(n), in blocks; used by --verify).
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    if os.path.isdir(prefix + ".parts"):
        raise DataFileError(f"{prefix} is an unfinished l2e-prepare-data output ({prefix}.parts exists): "
                            "re-run the same command to finish it")
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise DataFileError(f"{path} not found: data paths are .bin/.idx prefixes without the extension")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:9] != INDEX_MAGIC:
        raise DataFileError(f"{idx_path} is not a Megatron/GPT-NeoX index file (bad header): regenerate it")
    version, code, n, d = struct.unpack("<QBQQ", header[9:])
    if version != 1 or code not in DTYPE_CODES:
        raise DataFileError(f"{idx_path}: unsupported version {version} / dtype code {code}: regenerate it")
    expected = HEADER_BYTES + 4 * n + 8 * n + 8 * d
    if idx_size != expected:
        raise DataFileError(
            f"{idx_path} is truncated or corrupt: {idx_size} bytes but its header describes {expected}; regenerate it"
        )
    dtype = DTYPE_CODES[code]
    itemsize = np.dtype(dtype).itemsize
    index = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=n, offset=HEADER_BYTES)
    pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
    documents = np.frombuffer(index, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * n)
    if n == 0:
        raise DataFileError(f"{idx_path} holds no documents: regenerate it from non-empty inputs")
    if d == 0 or documents[0] != 0 or documents[-1] != n:
        raise DataFileError(f"{idx_path}: document index does not span the {n} sequences: regenerate it")
    bin_size = os.path.getsize(bin_path)
    expected_bin = int(pointers[-1]) + int(lengths[-1]) * itemsize
    if bin_size != expected_bin:
        raise DataFileError(
            f"{bin_path} has {bin_size} bytes but {idx_path} describes {expected_bin}: the pair is truncated or "
            "from different runs; regenerate it"
        )
    num_tokens = expected_bin // itemsize
    if deep:
        block = 1 << 24
        for start in range(0, n, block):
            stop = min(n, start + block)
            lens = lengths[start:stop].astype(np.int64)
            if (lens < 0).any():
                raise DataFileError(f"{idx_path}: negative sequence length near sequence {start}: regenerate it")
            expect = np.empty(stop - start, dtype=np.int64)
            expect[0] = 0 if start == 0 else int(pointers[start - 1]) + int(lengths[start - 1]) * itemsize
            np.cumsum(lens[:-1] * itemsize, out=expect[1:])
            expect[1:] += expect[0]
            bad = np.flatnonzero(pointers[start:stop] != expect)
            if bad.size:
                raise DataFileError(
                    f"{idx_path}: pointer of sequence {start + int(bad[0])} disagrees with the lengths: regenerate it"
                )
        if (np.diff(documents) < 0).any():
            raise DataFileError(f"{idx_path}: document indices decrease: regenerate it")
    del index
    return IndexInfo(prefix, dtype, int(n), int(d) - 1, int(num_tokens))


def open_indexed(prefix: str):
    """megatron-core IndexedDataset over a checked prefix (mmap, no torch.distributed needed)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_index(prefix)
    return IndexedDataset(prefix, multimodal=False, mmap=True)


def write_labels(prefix: str, labels: np.ndarray, names: list[str], field: str) -> None:
    """Write the per-document feature-label sidecar (atomic; .json after .npy)."""
    atomic_save_npy(prefix + ".labels.npy", np.asarray(labels, dtype=np.int32))
    atomic_write_json(prefix + ".labels.json", {"field": field, "names": list(names)})


def read_labels(prefix: str, num_documents: int) -> tuple[np.ndarray, list[str]] | None:
    """(labels per document, names) when the sidecar exists; None when it does not."""
    npy, meta = prefix + ".labels.npy", prefix + ".labels.json"
    if not (os.path.isfile(npy) and os.path.isfile(meta)):
        return None
    try:
        with open(meta) as stream:
            names = list(json.load(stream)["names"])
        labels = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, KeyError) as exc:
        raise DataFileError(f"cannot read label sidecar {npy}/{meta}: {exc}; delete or regenerate them") from None
    if labels.ndim != 1 or labels.shape[0] != num_documents:
        raise DataFileError(
            f"{npy} has {labels.shape[0] if labels.ndim == 1 else labels.shape} labels for {num_documents} documents "
            "in the .idx: the sidecar is from another run; regenerate it or set data.labels: false"
        )
    if labels.size and (int(labels.max()) >= len(names) or int(labels.min()) < -1):
        raise DataFileError(f"{npy} has label ids outside {meta}'s {len(names)} names: regenerate the sidecar")
    return labels, names


def read_meta(prefix: str) -> dict | None:
    """`<prefix>.meta.json` written by l2e-prepare-data, or None (e.g. Pythia's published files)."""
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as stream:
            return json.load(stream)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read {path}: {exc}; delete or regenerate it") from None
