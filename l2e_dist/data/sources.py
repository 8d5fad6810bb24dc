"""Reading raw documents: local jsonl / jsonl.zst / jsonl.gz / parquet files or a `datasets` name.

Records are cut into fixed-size batches per source (a batch never spans two files), so the same inputs always
give the same batches: that is what makes l2e-prepare-data resumable and its output byte-identical.
JSON lines are passed on raw (bytes) and parsed by the worker that tokenizes them; parquet and `datasets`
records arrive as dicts.
"""

from __future__ import annotations

import glob
import gzip
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import zstandard

from l2e_dist.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


class InputError(UserError, ValueError):
    """Unreadable or unusable input (one line: what and how to fix it)."""


@dataclass
class Batch:
    """Up to `chunk_docs` consecutive records of one source; `records` is None when the caller skips it."""

    index: int
    source: str
    first_record: int  # 1-based line (jsonl) or row (parquet, datasets) number of records[0]
    num_records: int
    records: list | None = field(default=None, repr=False)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (searched recursively, sorted) and glob patterns -> ordered list of input files."""
    files: list[str] = []
    suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(d, f) for d, _, names in os.walk(item) for f in names if f.endswith(suffixes)
            )
            if not found:
                raise InputError(f"no {'/'.join(suffixes)} files under directory {item}")
            files += found
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise InputError(f"no file matches {item}")
            files += found
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise InputError(f"input not found: {item}")
    for path in files:
        if not path.endswith(suffixes):
            raise InputError(f"unsupported input type: {path} (expected one of {', '.join(suffixes)})")
    return files


def dotted_get(record: dict, dotted: str) -> tuple[bool, object]:
    """(found, value) of `a.b.c` in nested dicts (Pile labels live at meta.pile_set_name)."""
    value: object = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def _zst_blocks(path: str) -> Iterator[bytes]:
    """Decompressed blocks of a (multi-frame) .zst file; a truncated last frame is an error.

    zstandard's stream_reader returns a short read instead of failing on a truncated file, which would
    silently shorten the dataset, hence this loop over decompressobj with an explicit end-of-frame check.
    """
    if os.path.getsize(path) == 0:
        raise InputError(f"{path} is empty (0 bytes), not a zstd file: re-download or remove it")
    # The Pile's shards use long windows; 2 GiB is zstd's documented maximum.
    context = zstandard.ZstdDecompressor(max_window_size=2**31)
    decoder = context.decompressobj()
    in_frame = False
    with open(path, "rb") as raw:
        for data in iter(lambda: raw.read(1 << 20), b""):
            while data:
                out = decoder.decompress(data)
                in_frame = not decoder.eof
                if out:
                    yield out
                data = b""
                if decoder.eof:  # next frame, if any, starts in the unused bytes
                    data, decoder = decoder.unused_data, context.decompressobj()
    if in_frame:
        raise InputError(f"{path}: the zstd stream ends mid-frame; the file is corrupt or truncated")


def _lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        rest = b""
        for block in _zst_blocks(path):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from lines
        if rest:
            yield rest
        return
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as stream:
        yield from stream


def _jsonl_batches(path: str, size: int) -> Iterator[tuple[int, list[bytes]]]:
    batch: list[bytes] = []
    first = 1
    try:
        for line_no, line in enumerate(_lines(path), start=1):
            batch.append(line)
            if len(batch) == size:
                yield first, batch
                batch, first = [], line_no + 1
    except (OSError, EOFError, zstandard.ZstdError) as exc:  # how zstd/gzip corruption surfaces
        raise InputError(f"{path}: cannot read ({exc}); the file is corrupt or truncated") from None
    if batch:
        yield first, batch


def _parquet_batches(path: str, size: int, fields: list[str]) -> Iterator[tuple[int, list[dict]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise InputError(f"{path}: cannot read parquet ({exc})") from None
    present = set(parquet.schema_arrow.names)
    columns = sorted({f.split(".", 1)[0] for f in fields} & present)
    if fields[0].split(".", 1)[0] not in present:
        raise InputError(
            f"{path} has no column {fields[0].split('.', 1)[0]!r} (columns: {', '.join(sorted(present))}): "
            "set --text-field"
        )
    rows = (row for record_batch in parquet.iter_batches(batch_size=size, columns=columns)
            for row in record_batch.to_pylist())
    yield from _numbered_batches(rows, size)


def _hf_batches(name: str, config: str | None, split: str, data_files: list[str] | None,
                size: int) -> Iterator[tuple[int, list[dict]]]:
    import datasets

    stream = datasets.load_dataset(name, config, split=split, data_files=data_files or None, streaming=True)
    yield from _numbered_batches(stream, size)


def _numbered_batches(rows: Iterable[dict], size: int) -> Iterator[tuple[int, list[dict]]]:
    """(1-based number of the first row, rows) in batches of `size`; the last batch may be shorter."""
    batch: list[dict] = []
    first = 1
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield first, batch
            first += size
            batch = []
    if batch:
        yield first, batch


@dataclass
class SourceSpec:
    """Where documents come from: local files, or a `datasets` name (+ config, split, data files)."""

    files: list[str] = field(default_factory=list)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] = field(default_factory=list)

    def describe(self) -> list[dict]:
        """Identity of the inputs, stored in the plan: a changed input must not be resumed into old output."""
        if self.hf_dataset:
            return [{"dataset": self.hf_dataset, "config": self.hf_config, "split": self.hf_split,
                     "data_files": [{"path": os.path.abspath(p), "size": os.path.getsize(p)}
                                    for p in self.hf_data_files if os.path.isfile(p)]}]
        return [{"path": os.path.abspath(p), "size": os.path.getsize(p), "mtime_ns": os.stat(p).st_mtime_ns}
                for p in self.files]


def iter_batches(spec: SourceSpec, size: int, fields: list[str],
                 wanted: Callable[[int], bool] = lambda _: True) -> Iterator[Batch]:
    """Batches of `size` records in input order; records are only kept for batches where `wanted(index)`.

    `fields[0]` is the text field (used to check parquet schemas); the others are read when present.
    """
    if spec.hf_dataset:
        label = f"{spec.hf_dataset}[{spec.hf_config or ''}:{spec.hf_split}]"
        sources: list[tuple[str, Iterator]] = [
            (label, _hf_batches(spec.hf_dataset, spec.hf_config, spec.hf_split, spec.hf_data_files, size))]
    else:
        sources = [(path, _parquet_batches(path, size, fields) if path.endswith(PARQUET_SUFFIXES)
                    else _jsonl_batches(path, size)) for path in spec.files]
    index = 0
    for name, batches in sources:
        for first, records in batches:
            yield Batch(index, name, first, len(records), records if wanted(index) else None)
            index += 1
