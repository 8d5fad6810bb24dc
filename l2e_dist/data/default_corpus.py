"""A small labelled corpus that exists on every machine: the Python standard library's docstrings.

Used when `data.paths` is empty (tests, smoke runs, CI) so training needs no download. Every module, class and
function docstring of the stdlib (tests excluded) is one document; its feature label is the top-level package it
comes from (`asyncio`, `email`, ...) or `toplevel-modules` for single-file modules, so FKR has real labels.
The build is deterministic: same Python version -> same files -> byte-identical tokenizer, .bin/.idx and sidecars.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import os
import shutil
import sys
import sysconfig
import warnings

import numpy as np

from l2e_dist.data.indexed import write_labels
from l2e_dist.data.tokenizer import TextTokenizer, train_sentencepiece
from l2e_dist.fileio import atomic_write_json

BUILD_VERSION = 2  # bump when the recipe below changes, so old caches are not reused
VOCAB_SIZE = 3000
PREFIX_NAME = "stdlib-docstrings"
TOKENIZER_NAME = "tokenizer.model"
TOPLEVEL_LABEL = "toplevel-modules"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_files() -> tuple[str, list[str]]:
    """(stdlib root, sorted relative paths of its .py files, tests and third-party packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        rel_dir = os.path.relpath(directory, root)
        for name in sorted(names):
            if name.endswith(".py"):
                files.append(name if rel_dir == "." else os.path.join(rel_dir, name))
    return root, files


def _cache_key(root: str, files: list[str]) -> str:
    digest = hashlib.sha256(f"v{BUILD_VERSION} {sys.version_info[:3]} {VOCAB_SIZE}\n".encode())
    for rel in files:
        digest.update(f"{rel.replace(os.sep, '/')} {os.path.getsize(os.path.join(root, rel))}\n".encode())
    return digest.hexdigest()[:16]


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(docstring, label) for every non-empty stdlib docstring, in file then `ast.walk` order."""
    root, files = _stdlib_files()
    documents = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as stream:
            source = stream.read()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        label = rel.split(os.sep, 1)[0] if os.sep in rel else TOPLEVEL_LABEL
        for node in _documented_nodes(tree):
            text = ast.get_docstring(node, clean=True)
            if text and text.strip():
                documents.append((text, label))
    return documents


def _documented_nodes(tree: ast.Module):
    """The module, then every class/function in depth-first source order (statements only: ast.walk would
    also visit every expression)."""
    yield tree
    stack = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        children = []
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children += [c for c in getattr(node, name, ()) if isinstance(c, ast.AST)]
        stack.extend(reversed(children))


def _build(directory: str) -> None:
    """Write tokenizer, .bin/.idx, label sidecar and meta into `directory` (a private temp dir)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    documents = stdlib_docstrings()
    model_path = os.path.join(directory, TOKENIZER_NAME)
    train_sentencepiece((text for text, _ in documents), model_path, VOCAB_SIZE)
    tokenizer = TextTokenizer(model_path, threads=False)
    prefix = os.path.join(directory, PREFIX_NAME)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    num_tokens = 0
    for ids in tokenizer.encode_batch([text for text, _ in documents]):
        tokens = np.array([*ids, tokenizer.eod_id], dtype=np.uint16)
        builder.add_document(tokens, [tokens.size])
        num_tokens += tokens.size
    builder.finalize(prefix + ".idx")
    names = sorted({label for _, label in documents})
    label_ids = np.array([names.index(label) for _, label in documents], dtype=np.int32)
    write_labels(prefix, label_ids, names, field="stdlib top-level package")
    described = tokenizer.describe() | {"path": TOKENIZER_NAME}  # relative: the directory is renamed
    atomic_write_json(
        prefix + ".meta.json",
        {"format": "l2e-dist-data/1", "tokenizer": described, "dtype": "uint16", "documents": len(documents),
         "tokens": num_tokens, "source": f"python {sys.version.split()[0]} stdlib docstrings"},
    )


def prepare_default_corpus(cache_dir: str) -> str:
    """Build the stdlib-docstring corpus under `cache_dir` once and return its .bin/.idx prefix.

    Idempotent and safe under concurrency: builders take an exclusive lock, build in a private temp directory
    and rename it into place, so readers only ever see a complete corpus.
    """
    root, files = _stdlib_files()
    base = os.path.join(os.path.abspath(cache_dir), "default-corpus")
    final = os.path.join(base, _cache_key(root, files))
    prefix = os.path.join(final, PREFIX_NAME)
    if os.path.isfile(prefix + ".meta.json"):
        return prefix
    os.makedirs(base, exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(prefix + ".meta.json"):
            tmp = f"{final}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                _build(tmp)
                shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover (meta.json is written last)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return prefix
