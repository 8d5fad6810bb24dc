"""Labelled token samples for offline analysis: fixed-length rows of tokens with a feature id per token.

Two sources:
* a Megatron `.bin/.idx` prefix written by l2e-prepare-data (or Pythia's), with its `.labels.npy/json` sidecar
  (per-document feature, e.g. The Pile's `pile_set_name`). Stratified by label: documents are drawn in a
  seeded random order within each label, and the labels take turns, so even a small budget covers every
  label present (unknown-label documents come last).
* Pile-format jsonl files (`{"text": ..., "meta": {"pile_set_name": ...}}`, also .zst/.gz) and a tokenizer,
  read in file order (the Pile's shards are already shuffled).

Each document contributes a window of at most `doc_window` tokens (at a seeded random offset; 0 = the whole
document; raised to budget / documents for a corpus too small to fill the budget otherwise): Pile documents (code files, court opinions, books) are long, and without a bound a 16k-token budget
is two documents of one subset. The windows (plus the end-of-document token when a window ends the document,
as in training) are concatenated and cut into rows of `seq_length` tokens, the way training packs them;
every token carries its document's feature (-1 = unknown).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from l2e_dist.data.indexed import HEADER_BYTES, IndexInfo, check_index, read_labels
from l2e_dist.errors import UserError

DEFAULT_DOC_WINDOW = 256  # tokens per document at most (0: whole documents)


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


def _window(ids: np.ndarray, doc_window: int, rng: np.random.Generator) -> np.ndarray:
    """At most `doc_window` consecutive tokens of a document, at a random offset (0: all of it)."""
    if doc_window <= 0 or len(ids) <= doc_window:
        return ids
    start = int(rng.integers(0, len(ids) - doc_window + 1))
    return ids[start:start + doc_window]


def _stratified_order(labels: np.ndarray | None, num_documents: int, per_label: int,
                      rng: np.random.Generator) -> list[int]:
    """Document ids, labels taking turns (ascending label id, unknown last), each label's documents in a
    seeded random order; at most `per_label` per label (enough for the budget). Reads the permutation in
    chunks so that a huge corpus is not scanned further than needed."""
    order = rng.permutation(num_documents)
    if labels is None:
        return [int(d) for d in order[:per_label]]
    present = int(np.count_nonzero(np.bincount(np.asarray(labels, dtype=np.int64) + 1)))  # labels incl. -1
    picked: dict[int, list[int]] = {}
    chunk = 1 << 20
    for start in range(0, num_documents, chunk):
        docs = order[start:start + chunk]
        doc_labels = np.asarray(labels[docs])
        for label in np.unique(doc_labels):
            have = picked.setdefault(int(label), [])
            if len(have) < per_label:
                have.extend(int(d) for d in docs[doc_labels == label][:per_label - len(have)])
        if len(picked) == present and all(len(v) >= per_label for v in picked.values()):
            break
    turns = sorted(picked, key=lambda label: (label < 0, label))
    return [picked[label][i] for i in range(per_label) for label in turns if i < len(picked[label])]


def sample_indexed(prefix: str, seq_length: int, max_tokens: int, seed: int = 0,
                   doc_window: int = DEFAULT_DOC_WINDOW) -> LabelledTokens:
    """Rows from a `.bin/.idx` prefix and its label sidecar (unlabelled data: every feature is -1),
    stratified by label, `doc_window` tokens at most per document."""
    info = check_index(prefix)
    if info.num_tokens == 0:
        raise SampleError(f"{prefix} holds no tokens")
    if doc_window < 0:
        raise SampleError(f"--doc-window must be >= 0 (0: whole documents), got {doc_window}")
    read = _DocumentReader(prefix, info)
    sidecar = read_labels(prefix, info.num_documents)
    labels, names = sidecar if sidecar is not None else (None, [])
    rng = np.random.default_rng(seed)
    if doc_window:  # a corpus with few documents gives each more, so that the budget can still be filled
        doc_window = max(doc_window, -(-max_tokens // info.num_documents))
    # Documents may be shorter than the window: up to one per budget token per label is enough in any case.
    order = _stratified_order(labels, info.num_documents, min(max_tokens, info.num_documents), rng)

    def documents() -> Iterator[tuple[np.ndarray, int]]:
        for doc in order:
            yield _window(read(doc), doc_window, rng), (int(labels[doc]) if labels is not None else -1)

    tokens, features, used = _pack(documents(), seq_length, max_tokens, prefix)
    return LabelledTokens(tokens, features, list(names), {
        "kind": "indexed", "prefix": prefix, "documents_used": used, "documents_total": info.num_documents,
        "labelled": sidecar is not None, "seed": seed, "doc_window": doc_window,
        "labels_covered": int(np.unique(features[features >= 0]).size)})


def sample_jsonl(inputs: list[str], tokenizer_path: str, seq_length: int, max_tokens: int, *,
                 text_field: str = "text", label_field: str | None = "meta.pile_set_name",
                 eod_token: str | None = None, doc_window: int = DEFAULT_DOC_WINDOW,
                 seed: int = 0) -> LabelledTokens:
    """Rows from Pile-format jsonl files, tokenized here (text + end-of-document token per document), in
    file order, `doc_window` tokens at most per document (no stratification: labels are not known upfront).

    Malformed records and empty texts are skipped (the count goes into the report's source description).
    """
    from l2e_dist.data.prepare import RecordCounts, RecordParser
    from l2e_dist.data.sources import SourceSpec, expand_inputs, iter_batches
    from l2e_dist.data.tokenizer import TextTokenizer

    if doc_window < 0:
        raise SampleError(f"--doc-window must be >= 0 (0: whole documents), got {doc_window}")
    tokenizer = TextTokenizer(tokenizer_path, eod_token=eod_token)
    rng = np.random.default_rng(seed)
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
                    document = np.asarray(ids + [tokenizer.eod_id], dtype=np.int64)
                    yield _window(document, doc_window, rng), label_id

    tokens, features, used = _pack(documents(), seq_length, max_tokens, ", ".join(inputs))
    names = sorted(first_seen)
    remap = np.array([names.index(n) for n in first_seen] + [-1], dtype=np.int64)  # -1 indexes the last entry
    return LabelledTokens(tokens, remap[features], names, {
        "kind": "jsonl", "inputs": list(inputs), "tokenizer": tokenizer.path, "documents_used": used,
        "skipped_bad_records": counts.bad_records, "skipped_empty": counts.empty,
        "label_field": label_field, "doc_window": doc_window, "seed": seed,
        "labels_covered": int(np.unique(features[features >= 0]).size)})

