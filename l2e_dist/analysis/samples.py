"""Labelled token samples for offline analysis: fixed-length rows of tokens with a feature id per token.

Two sources:
* a Megatron `.bin/.idx` prefix written by l2e-prepare-data (or Pythia's), with its `.labels.npy/json` sidecar
  (per-document feature, e.g. The Pile's `pile_set_name`). Documents are taken in a seeded random order, so a
  corpus stored in source order (grouped by feature) is still sampled across features.
* Pile-format jsonl files (`{"text": ..., "meta": {"pile_set_name": ...}}`, also .zst/.gz) and a tokenizer,
  read in file order (the Pile's shards are already shuffled).

Documents (tokens + end-of-document token, as in training) are concatenated and cut into rows of `seq_length`
tokens, the way training packs them; every token carries its document's feature (-1 = unknown). The last
document is cut where the token budget ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from l2e_dist.data.indexed import HEADER_BYTES, IndexInfo, check_index, read_labels
from l2e_dist.errors import UserError


class SampleError(UserError, ValueError):
    """The data cannot give the requested sample (one line: what and how to fix it)."""


@dataclass
class LabelledTokens:
    tokens: np.ndarray  # [rows, seq_length] int64
    features: np.ndarray  # [rows, seq_length] int64 index into feature_names, -1 = unknown
    feature_names: list[str]
    source: dict = field(default_factory=dict)  # description stored in the report

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def _pack(documents: Iterator[tuple[np.ndarray, int]], seq_length: int, max_tokens: int,
          where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, features, documents used) in rows of seq_length, at most max_tokens // seq_length rows."""
    if seq_length < 1 or max_tokens < seq_length:
        raise SampleError(f"--max-tokens ({max_tokens}) must be >= --seq-length ({seq_length}) >= 1")
    budget = (max_tokens // seq_length) * seq_length
    tokens = np.empty(budget, dtype=np.int64)
    features = np.empty(budget, dtype=np.int64)
    filled = used = 0
    for ids, label in documents:
        take = min(len(ids), budget - filled)
        tokens[filled:filled + take] = ids[:take]
        features[filled:filled + take] = label
        filled += take
        used += 1
        if filled == budget:
            break
    rows = filled // seq_length
    if rows == 0:
        raise SampleError(f"{where} has only {filled} tokens, less than one row of --seq-length {seq_length}: "
                          "lower --seq-length or give more data")
    end = rows * seq_length
    return tokens[:end].reshape(rows, seq_length), features[:end].reshape(rows, seq_length), used


class _DocumentReader:
    """Token ids of document d of a checked `.bin/.idx` pair, read with numpy memory maps in the layout that
    `l2e_dist.data.indexed` documents (megatron-core's reader gives the same arrays but its import alone takes
    longer than a small analysis)."""

    def __init__(self, prefix: str, info: IndexInfo):
        n = info.num_sequences
        index = np.memmap(prefix + ".idx", dtype=np.uint8, mode="r")
        self.lengths = np.frombuffer(index, dtype=np.int32, count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
        self.doc_index = np.frombuffer(index, dtype=np.int64, count=info.num_documents + 1,
                                       offset=HEADER_BYTES + 12 * n)
        self.tokens = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")

    def __call__(self, doc: int) -> np.ndarray:
        parts = [self.tokens[self.pointers[s] // self.tokens.itemsize:][:self.lengths[s]]
                 for s in range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def sample_indexed(prefix: str, seq_length: int, max_tokens: int, seed: int = 0) -> LabelledTokens:
    """Rows from a `.bin/.idx` prefix and its label sidecar (unlabelled data: every feature is -1)."""
    info = check_index(prefix)
    if info.num_tokens == 0:
        raise SampleError(f"{prefix} holds no tokens")
    read = _DocumentReader(prefix, info)
    sidecar = read_labels(prefix, info.num_documents)
    labels, names = sidecar if sidecar is not None else (None, [])
    order = np.random.default_rng(seed).permutation(info.num_documents)

    def documents() -> Iterator[tuple[np.ndarray, int]]:
        for doc in order:
            yield read(int(doc)), (int(labels[doc]) if labels is not None else -1)

    tokens, features, used = _pack(documents(), seq_length, max_tokens, prefix)
    return LabelledTokens(tokens, features, list(names), {
        "kind": "indexed", "prefix": prefix, "documents_used": used, "documents_total": info.num_documents,
        "labelled": sidecar is not None, "seed": seed})


def sample_jsonl(inputs: list[str], tokenizer_path: str, seq_length: int, max_tokens: int, *,
                 text_field: str = "text", label_field: str | None = "meta.pile_set_name",
                 eod_token: str | None = None) -> LabelledTokens:
    """Rows from Pile-format jsonl files, tokenized here (text + end-of-document token per document).

    Malformed records and empty texts are skipped (the count goes into the report's source description).
    """
    from l2e_dist.data.prepare import RecordCounts, RecordParser
    from l2e_dist.data.sources import SourceSpec, expand_inputs, iter_batches
    from l2e_dist.data.tokenizer import TextTokenizer

    tokenizer = TextTokenizer(tokenizer_path, eod_token=eod_token)
    parser = RecordParser(text_field, label_field, on_bad_record="skip")
    counts = RecordCounts()
    first_seen: dict[str, int] = {}
    fields = [text_field] + ([label_field] if label_field else [])

    def documents() -> Iterator[tuple[np.ndarray, int]]:
        for batch in iter_batches(SourceSpec(files=expand_inputs(inputs)), 256, fields):
            parsed = [parser.parse(r, f"{batch.source}:{batch.first_record + k}", counts)
                      for k, r in enumerate(batch.records)]
            parsed = [p for p in parsed if p is not None]
            for ids, (_, label) in zip(tokenizer.encode_batch([text for text, _ in parsed]), parsed):
                if ids:
                    label_id = -1 if label is None else first_seen.setdefault(label, len(first_seen))
                    yield np.asarray(ids + [tokenizer.eod_id], dtype=np.int64), label_id

    tokens, features, used = _pack(documents(), seq_length, max_tokens, ", ".join(inputs))
    names = sorted(first_seen)
    remap = np.array([names.index(n) for n in first_seen] + [-1], dtype=np.int64)  # -1 indexes the last entry
    return LabelledTokens(tokens, remap[features], names, {
        "kind": "jsonl", "inputs": list(inputs), "tokenizer": tokenizer.path, "documents_used": used,
        "skipped_bad_records": counts.bad_records, "skipped_empty": counts.empty,
        "label_field": label_field})

