"""Build a seed's GPT-NeoX index maps (doc_idx, sample_idx, shuffle_idx) the way Pythia's GPT-NeoX built them.

gpt-neox d36f623 megatron/data/gpt2_dataset.py `_build_index_mappings`, with one np.random.RandomState(seed)
drawing, in this order:
  doc_idx     = the split's documents (sequence ids) repeated for num_epochs, as int32, shuffled (all epochs
                together: that GPT-NeoX has no separate last epoch);
  sample_idx  = helpers.build_sample_idx (windows of seq_length + 1 tokens over the doc_idx stream, overlapping
                by one token; megatron-core ships the same compiled helper);
  shuffle_idx = arange(len(sample_idx) - 1) as uint32 (int64 past 2**32 - 2), shuffled.
num_epochs is the least with (num_epochs * tokens_per_epoch - 1) // seq_length >= num_samples. The documents are
every sequence of the corpus (GPT-NeoX's `train-data-paths`, as Pythia's configs: the `train_0` maps), or one split
of them (`data-path` + `split`, Megatron's get_train_valid_test_split_ rounding). Files are named as GPT-NeoX
names them, so `data.index_maps` reads ours and the published ones alike.
"""

from __future__ import annotations

import os

import numpy as np

from l2e_dist.data.config import parse_split
from l2e_dist.data.dataset import split_boundaries
from l2e_dist.data.index_maps import IndexMapFiles
from l2e_dist.data.indexed import DataFileError, check_index, open_indexed
from l2e_dist.fileio import atomic_save_npy

SPLIT_NAMES = ("train", "valid", "test")


def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """gpt2_dataset.py _num_epochs: epochs needed for num_samples windows of seq_length + 1 tokens."""
    if tokens_per_epoch <= 1:
        raise DataFileError(f"the documents hold {tokens_per_epoch} tokens: too few to cut any sample")
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def build_index_maps(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) of GPT-NeoX for `documents` (sequence ids) of a corpus whose sequence
    lengths are `sizes`."""
    from megatron.core.datasets.helpers import build_sample_idx

    sizes = np.asarray(sizes, dtype=np.int32)
    documents = np.asarray(documents)
    tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
    epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = np.mgrid[0:epochs, 0 : len(documents)][1]  # _build_doc_idx
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, epochs, tokens_per_epoch, True, True)
    if sample_idx.max() <= np.iinfo(np.int32).max:
        sample_idx = sample_idx.astype(np.int32)  # GPT-NeoX's dtype
    size = sample_idx.shape[0] - 1  # _build_shuffle_idx
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(0, size, 1, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def map_files(corpus_prefix: str, output_dir: str, split_name: str, num_samples: int, seq_length: int,
              seed: int) -> IndexMapFiles:
    """GPT-NeoX's file names: `<corpus name>_<split>_indexmap_<N>ns_<L>sl_<seed>s_{doc,sample,shuffle}_idx.npy`."""
    name = f"{os.path.basename(corpus_prefix)}_{split_name}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s"
    return IndexMapFiles(os.path.join(os.path.abspath(output_dir), name), num_samples, seq_length, seed)


def write_index_maps(corpus_prefix: str, output_dir: str, *, num_samples: int, seq_length: int, seed: int,
                     split: str | None = None, split_name: str = "train") -> IndexMapFiles:
    """Build the maps of `corpus_prefix` and write them (atomically) into `output_dir` under GPT-NeoX's names;
    returns their files. `split` None: every document, named `train_0` (GPT-NeoX's `train-data-paths`, as
    Pythia's configs and the published maps); else `split_name`'s documents of that split, named `split_name`
    (GPT-NeoX's `data-path` + `split`). `l2e-prepare-data index-maps` calls this."""
    if num_samples < 1 or seq_length < 1 or seed < 0:
        raise DataFileError(f"need num_samples >= 1, seq_length >= 1 and seed >= 0, got {num_samples}, "
                            f"{seq_length}, {seed}")
    info = check_index(corpus_prefix)
    if split is None:
        documents, name = np.arange(info.num_sequences, dtype=np.int32), "train_0"
    else:
        which = SPLIT_NAMES.index(split_name)
        bounds = split_boundaries(info.num_sequences, parse_split(split))
        if bounds[which + 1] <= bounds[which]:
            raise DataFileError(f"split {split!r} gives the {split_name} split no documents of {corpus_prefix}: "
                                "give it a share")
        documents, name = np.arange(bounds[which], bounds[which + 1], dtype=np.int32), split_name
    indexed = open_indexed(corpus_prefix)  # keep it referenced: its lengths are a view of its memory map
    maps = build_index_maps(indexed.sequence_lengths, documents, num_samples, seq_length, seed)
    del indexed
    files = map_files(corpus_prefix, output_dir, name, num_samples, seq_length, seed)
    os.makedirs(output_dir, exist_ok=True)
    for kind, array in zip(("doc", "sample", "shuffle"), maps, strict=True):
        atomic_save_npy(files.path(kind), array)
    return files
