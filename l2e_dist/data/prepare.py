"""l2e-prepare-data: raw documents -> Megatron .bin/.idx + feature-label sidecar, parallel and resumable.

Pipeline: the main process reads the inputs in order and cuts them into batches of `chunk_docs` records
(sources.py); worker processes parse, tokenize (text + end-of-document token, as GPT-NeoX's preprocess_data
with --append-eod) and write each batch as its own small .bin/.idx ("chunk") with megatron-core's
IndexedDatasetBuilder under `<prefix>.parts/`, atomically, with a json marker written last. When every chunk
exists, they are concatenated in order (IndexedDatasetBuilder.add_index) into `<prefix>.bin/.idx`, the label
sidecar is written, then `<prefix>.meta.json` (which marks a finished dataset) and `.parts/` is removed.

Resume: chunks are a pure function of the inputs and the settings (recorded in `.parts/plan.json`), so a killed
run re-reads the inputs, skips the chunks whose marker exists and redoes the rest: the output is byte-identical
to an uninterrupted run, whatever the number of workers. Test hook: `L2E_PREPARE_TEST_KILL_AFTER_DOCS=N` makes
the run SIGKILL its workers and itself once N documents are committed (a real crash, mid-write for the others).

Bad input never shortens the dataset silently: malformed JSON, a missing or non-string text field fail with
`file:line` (or are skipped and counted with --on-bad-record skip); empty documents are skipped and counted;
documents without a label get label -1 and are counted. All counts are printed and stored in meta.json.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from l2e_dist.data.indexed import (
    DataFileError,
    check_index,
    dtype_for_vocab,
    read_labels,
    read_meta,
    write_labels,
)
from l2e_dist.data.sources import Batch, SourceSpec, dotted_get, iter_batches
from l2e_dist.data.tokenizer import TextTokenizer, train_sentencepiece
from l2e_dist.errors import UserError
from l2e_dist.fileio import atomic_write_json

FORMAT = "l2e-dist-data/1"
KILL_HOOK_ENV = "L2E_PREPARE_TEST_KILL_AFTER_DOCS"
MAX_BAD_EXAMPLES = 5


class PrepareError(UserError, ValueError):
    """Bad input under --on-bad-record fail, or an output that cannot be resumed (one line, with the fix)."""


@dataclass
class PrepareOptions:
    """Settings of one `l2e-prepare-data tokenize` run (everything but workers/progress/verify goes in the plan)."""

    output_prefix: str
    tokenizer: str
    source: SourceSpec
    text_field: str = "text"
    label_field: str | None = "meta.pile_set_name"
    eod_token: str | None = None
    dtype: str = "auto"  # auto | uint16 | int32
    on_bad_record: str = "fail"  # fail | skip
    chunk_docs: int = 4096
    workers: int = 1
    verify: bool = False
    progress: bool = True
    overwrite: bool = False


@dataclass
class RecordCounts:
    """Per-chunk (and total) bookkeeping of what was kept and what was skipped, and why."""

    documents: int = 0
    tokens: int = 0
    empty: int = 0
    bad_records: int = 0
    missing_label: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def add(self, other: RecordCounts) -> None:
        for name in ("documents", "tokens", "empty", "bad_records", "missing_label"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bad_examples = (self.bad_examples + other.bad_examples)[:MAX_BAD_EXAMPLES]


class RecordParser:
    """Record (JSON line bytes or dict) -> (text, label) or None, applying the bad-record policy."""

    def __init__(self, text_field: str, label_field: str | None, on_bad_record: str):
        self.text_field, self.label_field, self.on_bad_record = text_field, label_field, on_bad_record

    def _bad(self, counts: RecordCounts, where: str, problem: str) -> None:
        if self.on_bad_record == "fail":
            raise PrepareError(f"{where}: {problem}; fix the input or pass --on-bad-record skip to skip and count")
        counts.bad_records += 1
        if len(counts.bad_examples) < MAX_BAD_EXAMPLES:
            counts.bad_examples.append(f"{where}: {problem}")

    def parse(self, record: bytes | dict, where: str, counts: RecordCounts) -> tuple[str, str | None] | None:
        if isinstance(record, bytes):
            if not record.strip():
                return None  # a blank line is not a record
            try:
                record = json.loads(record)
            except ValueError as exc:
                self._bad(counts, where, f"malformed JSON ({exc})")
                return None
        if not isinstance(record, dict):
            self._bad(counts, where, f"expected a JSON object, got {type(record).__name__}")
            return None
        found, text = dotted_get(record, self.text_field)
        if not found:
            self._bad(counts, where, f"no text field {self.text_field!r} (set --text-field)")
            return None
        if not isinstance(text, str):
            self._bad(counts, where, f"text field {self.text_field!r} is {type(text).__name__}, not a string")
            return None
        if not text.strip():
            counts.empty += 1
            return None
        label = None
        if self.label_field:
            found, value = dotted_get(record, self.label_field)
            if found and value is not None and value != "":
                label = str(value)
        return text, label


# Per-process worker state (set by _init_worker; the main process uses it too when workers == 1).
_WORKER: dict = {}


def _init_worker(options: PrepareOptions, parts_dir: str, in_pool: bool) -> None:
    if in_pool:  # processes already use every core: keep each tokenizer single-threaded
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = TextTokenizer(options.tokenizer, eod_token=options.eod_token, threads=not in_pool)
    _WORKER.update(
        tokenizer=tokenizer,
        dtype=dtype_for_vocab(tokenizer.vocab_size, options.dtype),
        parser=RecordParser(options.text_field, options.label_field, options.on_bad_record),
        parts_dir=parts_dir,
    )


def chunk_prefix(parts_dir: str, index: int) -> str:
    return os.path.join(parts_dir, f"chunk-{index:07d}")


def process_batch(batch: Batch) -> RecordCounts:
    """Parse + tokenize one batch and write it as a chunk (.bin/.idx, then the .json marker), atomically."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer: TextTokenizer = _WORKER["tokenizer"]
    parser: RecordParser = _WORKER["parser"]
    dtype = _WORKER["dtype"]
    counts = RecordCounts()
    texts, labels = [], []
    for offset, record in enumerate(batch.records):
        parsed = parser.parse(record, f"{batch.source}:{batch.first_record + offset}", counts)
        if parsed is not None:
            texts.append(parsed[0])
            labels.append(parsed[1])
    prefix = chunk_prefix(_WORKER["parts_dir"], batch.index)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    digest = hashlib.sha256()
    kept_labels = []
    eod = tokenizer.eod_id
    for ids, label in zip(tokenizer.encode_batch(texts), labels):
        if not ids:  # text that tokenizes to nothing is an empty document too
            counts.empty += 1
            continue
        if label is None and parser.label_field:
            counts.missing_label += 1
        tokens = np.array(ids + [eod], dtype=dtype)
        builder.add_document(tokens, [tokens.size])
        digest.update(tokens.tobytes())
        counts.documents += 1
        counts.tokens += tokens.size
        kept_labels.append(label)
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    atomic_write_json(prefix + ".json", {"counts": asdict(counts), "sha256": digest.hexdigest(),
                                         "labels": kept_labels, "source": batch.source,
                                         "first_record": batch.first_record, "records": batch.num_records})
    return counts


def _plan(options: PrepareOptions, tokenizer: TextTokenizer) -> dict:
    """Everything the output bytes depend on; a resumed run must match it exactly."""
    return {
        "format": FORMAT,
        "sources": options.source.describe(),
        "tokenizer_sha256": tokenizer.sha256,
        "eod_id": tokenizer.eod_id,
        "dtype": np.dtype(dtype_for_vocab(tokenizer.vocab_size, options.dtype)).name,
        "text_field": options.text_field,
        "label_field": options.label_field,
        "on_bad_record": options.on_bad_record,
        "chunk_docs": options.chunk_docs,
    }


def _final_paths(prefix: str) -> list[str]:
    return [prefix + s for s in (".bin", ".idx", ".labels.npy", ".labels.json", ".meta.json")]


def _kill_everything() -> None:
    """Test hook: die like a node failure would (no cleanup, workers mid-write)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _run_chunks(options: PrepareOptions, parts_dir: str, fields: list[str]) -> tuple[int, RecordCounts, float]:
    """Tokenize every chunk that is not done yet. Returns (number of chunks, counts of new work, seconds)."""
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow import: before the clock, and before forking)
    from tqdm import tqdm

    def done(index: int) -> bool:
        return os.path.isfile(chunk_prefix(parts_dir, index) + ".json")

    kill_after = int(os.environ.get(KILL_HOOK_ENV, "0") or 0)
    new = RecordCounts()
    num_chunks = 0
    start = time.perf_counter()
    bar = tqdm(desc="tokenize", unit="doc", unit_scale=True, disable=not options.progress, dynamic_ncols=True)

    def commit(counts: RecordCounts) -> None:
        new.add(counts)
        bar.update(counts.documents)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{new.tokens / elapsed:,.0f} tok/s", refresh=False)
        if kill_after and new.documents >= kill_after:
            _kill_everything()

    batches: Iterator[Batch] = iter_batches(options.source, options.chunk_docs, fields, wanted=lambda i: not done(i))
    try:
        if options.workers <= 1:
            _init_worker(options, parts_dir, in_pool=False)
            for batch in batches:
                num_chunks += 1
                if batch.records is not None:
                    commit(process_batch(batch))
        else:
            pool = multiprocessing.get_context("fork").Pool(
                options.workers, initializer=_init_worker, initargs=(options, parts_dir, True))
            try:
                pending: deque = deque()
                for batch in batches:
                    num_chunks += 1
                    if batch.records is None:
                        continue
                    pending.append(pool.apply_async(process_batch, (batch,)))
                    while len(pending) >= 2 * options.workers:  # bounded read-ahead
                        commit(pending.popleft().get())
                while pending:
                    commit(pending.popleft().get())
            finally:
                pool.terminate()
                pool.join()
    finally:
        bar.close()
    return num_chunks, new, time.perf_counter() - start


def _merge(options: PrepareOptions, prefix: str, parts_dir: str, num_chunks: int, tokenizer: TextTokenizer,
           plan: dict) -> dict:
    """Concatenate the chunks in order into the final files; meta.json is written last."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = dtype_for_vocab(tokenizer.vocab_size, options.dtype)
    chunks = []
    for index in range(num_chunks):
        with open(chunk_prefix(parts_dir, index) + ".json") as stream:
            chunks.append(json.load(stream))
    total = RecordCounts()
    for chunk in chunks:
        total.add(RecordCounts(**chunk["counts"]))
    if total.documents == 0:
        raise PrepareError(f"the inputs gave no documents ({total.empty} empty, {total.bad_records} bad records "
                           f"skipped, e.g. {total.bad_examples[:1]}): check the files and --text-field")
    tmp = f"{prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    # add_index runs gc.collect() per chunk, slow with torch's objects loaded; frozen objects are not rescanned
    gc.freeze()
    try:
        for index in range(num_chunks):
            builder.add_index(chunk_prefix(parts_dir, index))
    finally:
        gc.unfreeze()
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    label_counts: dict[str, int] = {}
    if options.label_field:
        all_labels = [label for chunk in chunks for label in chunk["labels"]]
        names = sorted({label for label in all_labels if label is not None})
        ids = {name: i for i, name in enumerate(names)}
        write_labels(prefix, np.array([ids.get(x, -1) for x in all_labels], dtype=np.int32), names,
                     field=options.label_field)
        for label in all_labels:
            if label is not None:
                label_counts[label] = label_counts.get(label, 0) + 1
    meta = {
        "format": FORMAT,
        "tokenizer": tokenizer.describe(),
        "dtype": np.dtype(dtype).name,
        "documents": total.documents,
        "tokens": total.tokens,
        "skipped": {"empty_documents": total.empty, "bad_records": total.bad_records},
        "bad_examples": total.bad_examples,
        "missing_label": total.missing_label,
        "label_counts": label_counts,
        "chunks": [{"documents": c["counts"]["documents"], "tokens": c["counts"]["tokens"], "sha256": c["sha256"],
                    "source": c["source"], "first_record": c["first_record"]} for c in chunks],
        "plan": plan,
    }
    atomic_write_json(prefix + ".meta.json", meta)
    shutil.rmtree(parts_dir)
    return meta


def prepare(options: PrepareOptions) -> dict:
    """Run (or resume, or just verify a finished) tokenization; returns a summary dict."""
    if options.chunk_docs < 1:
        raise PrepareError(f"--chunk-docs must be >= 1, got {options.chunk_docs}")
    tokenizer = TextTokenizer(options.tokenizer, eod_token=options.eod_token)
    plan = _plan(options, tokenizer)
    prefix = os.path.abspath(options.output_prefix)
    parts_dir = prefix + ".parts"
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    if options.overwrite:
        shutil.rmtree(parts_dir, ignore_errors=True)
        for path in _final_paths(prefix):
            if os.path.exists(path):
                os.remove(path)
    meta = read_meta(prefix)
    if meta is not None and meta.get("plan") != plan:
        raise PrepareError(f"{prefix}.bin/.idx already exist, made from other inputs or settings: "
                           "pass --overwrite or choose another --output-prefix")
    summary: dict = {"prefix": prefix}
    if meta is None:
        os.makedirs(parts_dir, exist_ok=True)
        plan_path = os.path.join(parts_dir, "plan.json")
        if os.path.isfile(plan_path):
            with open(plan_path) as stream:
                if json.load(stream) != plan:
                    raise PrepareError(f"{parts_dir} holds an unfinished run with other inputs or settings: rerun "
                                       "with the same ones to resume, or pass --overwrite to start over")
        else:
            atomic_write_json(plan_path, plan)
        for name in os.listdir(parts_dir):  # leftovers of a killed run (never completed chunks)
            if ".tmp-" in name:
                os.remove(os.path.join(parts_dir, name))
        for path in _final_paths(prefix):  # a killed merge, or stale sidecars of another run
            if os.path.exists(path):
                os.remove(path)
        fields = [options.text_field] + ([options.label_field] if options.label_field else [])
        num_chunks, new, seconds = _run_chunks(options, parts_dir, fields)
        meta = _merge(options, prefix, parts_dir, num_chunks, tokenizer, plan)
        summary.update(new_documents=new.documents, new_tokens=new.tokens, seconds=seconds,
                       docs_per_s=new.documents / max(seconds, 1e-9), tokens_per_s=new.tokens / max(seconds, 1e-9))
    elif os.path.isdir(parts_dir):  # killed after meta.json but before the cleanup
        shutil.rmtree(parts_dir)
    summary.update(documents=meta["documents"], tokens=meta["tokens"], skipped=meta["skipped"],
                   missing_label=meta["missing_label"], bad_examples=meta["bad_examples"], dtype=meta["dtype"])
    if options.verify:
        summary["verified"] = verify_prepared(prefix)
    return summary


def verify_prepared(prefix: str) -> dict:
    """Read a finished output back completely and check it against meta.json; raises DataFileError."""
    meta = read_meta(prefix)
    if meta is None or meta.get("format") != FORMAT:
        raise DataFileError(f"{prefix}.meta.json missing: not a finished l2e-prepare-data output (re-run it)")
    info = check_index(prefix, deep=True)
    if (info.num_documents, info.num_tokens) != (meta["documents"], meta["tokens"]):
        raise DataFileError(f"{prefix}: .idx has {info.num_documents} documents / {info.num_tokens} tokens, "
                            f"meta.json {meta['documents']} / {meta['tokens']}: regenerate it")
    if np.dtype(info.dtype).name != meta["dtype"]:
        raise DataFileError(f"{prefix}: .idx dtype {np.dtype(info.dtype).name} != meta.json {meta['dtype']}")
    itemsize = np.dtype(info.dtype).itemsize
    index = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
    n = info.num_sequences
    lengths = np.frombuffer(index, dtype=np.int32, count=n, offset=34)
    pointers = np.frombuffer(index, dtype=np.int64, count=n, offset=34 + 4 * n)
    documents = np.frombuffer(index, dtype=np.int64, count=n + 1, offset=34 + 12 * n)
    if not np.array_equal(documents, np.arange(n + 1)) or (lengths < 1).any():
        raise DataFileError(f"{prefix}: expected one non-empty sequence per document: regenerate it")
    tokens = np.memmap(prefix + ".bin", mode="r", dtype=info.dtype)
    eod, vocab_size = meta["tokenizer"]["eod_id"], meta["tokenizer"]["vocab_size"]
    if not (tokens[pointers // itemsize + lengths - 1] == eod).all():
        raise DataFileError(f"{prefix}: a document does not end with the end-of-document token {eod}")
    position = 0
    for number, chunk in enumerate(meta["chunks"]):
        data = tokens[position : position + chunk["tokens"]]
        if data.size and int(data.max()) >= vocab_size:
            raise DataFileError(f"{prefix}: token id {int(data.max())} >= vocab size {vocab_size} in chunk {number}")
        if hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest() != chunk["sha256"]:
            raise DataFileError(f"{prefix}: tokens of chunk {number} ({chunk['source']} from record "
                                f"{chunk['first_record']}) differ from what was written: regenerate it")
        position += chunk["tokens"]
    if position != info.num_tokens:
        raise DataFileError(f"{prefix}: chunks cover {position} tokens, the .bin holds {info.num_tokens}")
    if meta["plan"]["label_field"]:
        sidecar = read_labels(prefix, info.num_documents)
        if sidecar is None:
            raise DataFileError(f"{prefix}.labels.npy/.json missing: regenerate them")
        labels, names = sidecar
        counts = np.bincount(np.asarray(labels) + 1, minlength=len(names) + 1)
        found = {name: int(c) for name, c in zip(names, counts[1:]) if c}
        if found != meta["label_counts"] or int(counts[0]) != meta["missing_label"]:
            raise DataFileError(f"{prefix}: label sidecar counts differ from meta.json: regenerate it")
    del index, tokens
    return {"documents": info.num_documents, "tokens": info.num_tokens}


def train_tokenizer(source: SourceSpec, output: str, vocab_size: int, sample_docs: int, text_field: str,
                    on_bad_record: str, model_type: str) -> int:
    """Train a SentencePiece model on the first `sample_docs` documents of the inputs; returns docs used."""
    parser = RecordParser(text_field, None, on_bad_record)
    counts = RecordCounts()
    used = 0

    def texts() -> Iterator[str]:
        nonlocal used
        for batch in iter_batches(source, 1024, [text_field]):
            for offset, record in enumerate(batch.records):
                parsed = parser.parse(record, f"{batch.source}:{batch.first_record + offset}", counts)
                if parsed is not None:
                    used += 1
                    yield parsed[0]
                    if used >= sample_docs:
                        return

    train_sentencepiece(texts(), output, vocab_size, model_type=model_type)
    return used
