"""One small interface over HF `tokenizer.json` files (Pythia's GPT-NeoX-20B BPE) and SentencePiece models.

The data pipeline only needs: encode a batch of texts, decode ids, the vocabulary size (to pick the .bin dtype)
and the end-of-document id that is appended after every document.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator

from l2e_dist.errors import UserError
from l2e_dist.fileio import atomic_write_bytes

# Names used for the end-of-document token by common HF tokenizers, tried in this order.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")


class TokenizerError(UserError, ValueError):
    """A tokenizer file that is missing, unreadable or unusable for pretraining data."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TextTokenizer:
    """Loaded tokenizer: `.json` -> HF tokenizers, `.model` -> SentencePiece."""

    def __init__(self, path: str, eod_token: str | None = None, threads: bool = True):
        """`threads=False` keeps the HF tokenizer single-threaded (when worker processes already use every core)."""
        if not os.path.isfile(path):
            raise TokenizerError(
                f"tokenizer file not found: {path} (give an HF tokenizer.json or a SentencePiece .model, "
                "or train one with `l2e-prepare-data train-tokenizer`)"
            )
        self.path = os.path.abspath(path)
        self.sha256 = file_sha256(path)
        self._threads = threads
        if path.endswith(".json"):
            self.kind = "hf"
            self._load_hf(eod_token)
        elif path.endswith(".model"):
            self.kind = "sentencepiece"
            self._load_sentencepiece(eod_token)
        else:
            raise TokenizerError(f"unknown tokenizer file type: {path} (expected tokenizer.json or a .model file)")

    def _load_hf(self, eod_token: str | None) -> None:
        from tokenizers import Tokenizer

        try:
            self._hf = Tokenizer.from_file(self.path)
        except Exception as exc:  # the Rust library raises a bare Exception on a bad file
            raise TokenizerError(f"cannot load HF tokenizer {self.path}: {exc}") from None
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        names = (eod_token,) if eod_token else EOD_TOKEN_CANDIDATES
        for name in names:
            token_id = self._hf.token_to_id(name)
            if token_id is not None:
                self.eod_id, self.eod_token = int(token_id), name
                return
        raise TokenizerError(
            f"{self.path} has no end-of-document token {' / '.join(names)}: pass its name with --eod-token "
            "(data.eod_token)"
        )

    def _load_sentencepiece(self, eod_token: str | None) -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except Exception as exc:  # RuntimeError or OSError depending on the failure
            raise TokenizerError(f"cannot load SentencePiece model {self.path}: {exc}") from None
        self.vocab_size = self._sp.get_piece_size()
        if eod_token:
            token_id = self._sp.piece_to_id(eod_token)
            if token_id == self._sp.unk_id() and eod_token != self._sp.id_to_piece(token_id):
                raise TokenizerError(f"{self.path} has no piece {eod_token!r} (--eod-token / data.eod_token)")
            self.eod_id = int(token_id)
        else:
            self.eod_id = int(self._sp.eos_id())
            if self.eod_id < 0:
                raise TokenizerError(
                    f"{self.path} has no end-of-sentence id (eos_id=-1): pass a piece name with --eod-token"
                )
        self.eod_token = self._sp.id_to_piece(self.eod_id)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, WITHOUT the end-of-document token (as GPT-NeoX's preprocess_data encodes)."""
        if self.kind == "hf":
            if self._threads:
                return [enc.ids for enc in self._hf.encode_batch(texts)]
            return [self._hf.encode(text).ids for text in texts]
        return self._sp.encode(texts, out_type=int, num_threads=0 if self._threads else 1)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def describe(self) -> dict:
        """What is recorded in `<prefix>.meta.json` so the training side can find and check the tokenizer."""
        return {
            "path": self.path,
            "kind": self.kind,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "eod_token": self.eod_token,
        }


def train_sentencepiece(
    texts: Iterator[str], model_path: str, vocab_size: int, model_type: str = "bpe", eod_piece: str = "<|endoftext|>"
) -> None:
    """Train a byte-fallback SentencePiece model that round-trips text exactly (identity normalisation).

    Single-threaded with no input sampling, so the same texts give a byte-identical model on every machine.
    Each text is split into lines (SentencePiece trains on sentences; the newline is covered by byte fallback).
    """
    import io

    import sentencepiece as spm

    def lines() -> Iterator[str]:
        for text in texts:
            for line in text.split("\n"):
                if line.strip():
                    yield line

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            num_threads=1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            character_coverage=0.9995,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=0,
            eos_id=1,
            bos_id=-1,
            pad_id=-1,
            eos_piece=eod_piece,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise TokenizerError(f"SentencePiece training failed: {exc}") from None
    directory = os.path.dirname(os.path.abspath(model_path))
    os.makedirs(directory, exist_ok=True)
    atomic_write_bytes(model_path, buffer.getvalue())
