"""l2e-analyze's sample spans documents and features: on a labelled corpus of long documents stored grouped by
label (as a Pile subset dump is), the default budget covers every label in balanced shares, each document
gives a bounded window of itself; with fewer than two features FKR is undefined (null) and the CLI warns."""

from __future__ import annotations

import numpy as np

from l2e_dist.analysis.monosemanticity import analyze_layer
from l2e_dist.analysis.samples import sample_indexed
from launcher.analyze import build_parser
from tests.test_analyze import _write_indexed

NAMES = ["ArXiv", "FreeLaw", "Github"]


def _long_document_corpus(prefix: str, docs_per_label: int = 30, length: int = 4000) -> list[np.ndarray]:
    """Documents of `length` tokens, label k's tokens drawn from its own id range, stored label by label."""
    from l2e_dist.data.indexed import write_labels

    rng = np.random.default_rng(0)
    docs, labels = [], []
    for label in range(len(NAMES)):
        for _ in range(docs_per_label):
            docs.append(rng.integers(1 + 300 * label, 300 * (label + 1), size=length).astype(np.uint16))
            labels.append(label)
    _write_indexed(prefix, docs)
    write_labels(prefix, np.array(labels), NAMES, field="meta.pile_set_name")
    return docs


def test_default_budget_covers_every_label_of_long_documents(tmp_path):
    prefix = str(tmp_path / "pile")
    docs = _long_document_corpus(prefix)
    defaults = build_parser().parse_args(["model", "--data", prefix])
    sample = sample_indexed(prefix, defaults.seq_length, defaults.max_tokens, defaults.seed,
                            doc_window=defaults.doc_window)
    assert sample.num_tokens == defaults.max_tokens
    shares = np.bincount(sample.features.ravel(), minlength=3) / sample.num_tokens
    assert sample.source["labels_covered"] == 3 and shares.min() > 0.3, shares  # balanced thirds
    # every token's id range is its label's: features are the documents' labels
    assert np.all((sample.tokens.ravel() - 1) // 300 == sample.features.ravel())
    # each document contributes one window of at most doc_window consecutive tokens of itself
    stream = sample.tokens.ravel()
    starts = range(0, stream.size, defaults.doc_window)
    used = set()
    for start in starts:
        window = stream[start:start + defaults.doc_window]
        owner = [i for i, d in enumerate(docs) if _contains(d, window)]
        assert len(owner) == 1
        used.add(owner[0])
    assert len(used) == len(list(starts))  # all from different documents
    # whole documents (--doc-window 0): the same budget is only 5 of these documents
    whole = sample_indexed(prefix, defaults.seq_length, defaults.max_tokens, defaults.seed, doc_window=0)
    assert whole.source["documents_used"] == -(-defaults.max_tokens // 4000) == 5


def _contains(doc: np.ndarray, window: np.ndarray) -> bool:
    hits = np.flatnonzero(doc[: doc.size - window.size + 1] == window[0])
    return any(np.array_equal(doc[h:h + window.size], window) for h in hits)


def test_fkr_is_null_with_fewer_than_two_features():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((400, 8))
    one_feature = np.zeros(400, dtype=np.int64)
    one_feature[::7] = -1
    report = analyze_layer(z, one_feature, ["only"], ratios=(0.01, 0.05))
    assert all(t["fkr"] is None and t["selected_known"] > 0 for t in report["thresholds"])
    two = np.arange(400) % 2
    report = analyze_layer(z, two, ["a", "b"], ratios=(0.01, 0.05))
    assert all(t["fkr"] is not None and 0 < t["fkr"] < 1 for t in report["thresholds"])


def test_cli_warns_when_the_sample_has_one_feature(tmp_path, capsys):
    from launcher.analyze import _warn_about_coverage

    prefix = str(tmp_path / "pile")
    _long_document_corpus(prefix)
    sample = sample_indexed(prefix, 256, 256, 0, doc_window=256)  # one window: one feature
    _warn_about_coverage(sample)
    err = capsys.readouterr().err
    assert "FKR is undefined (null)" in err and len(err.strip().splitlines()) == 1
    sample = sample_indexed(prefix, 256, 1024, 0, doc_window=512)  # two windows: 2 of 3 features
    _warn_about_coverage(sample)
    assert "covers 2 of 3 features" in capsys.readouterr().err
