"""Data pipeline: Megatron .bin/.idx datasets (split, packed, blended, labelled) and deterministic batches.

Raw text -> .bin/.idx is `l2e-prepare-data` (l2e_dist.data.prepare); this package's training side reads those
files, Pythia's published ones, or the bundled stdlib-docstring corpus (`prepare_default_corpus`).
"""

from l2e_dist.data.config import DataConfig
from l2e_dist.data.dataset import Datasets, build_datasets
from l2e_dist.data.default_corpus import prepare_default_corpus
from l2e_dist.data.indexed import DataFileError
from l2e_dist.data.sampler import global_batch_iterator
from l2e_dist.data.tokenizer import TextTokenizer, TokenizerError

__all__ = [
    "DataConfig",
    "DataFileError",
    "Datasets",
    "TextTokenizer",
    "TokenizerError",
    "build_datasets",
    "global_batch_iterator",
    "prepare_default_corpus",
]
