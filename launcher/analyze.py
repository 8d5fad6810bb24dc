"""`l2e-analyze`: monosemanticity of MLP neurons per layer (MS scores, thresholds, FKR(p), per-feature K-S).

    l2e-analyze runs/l2e/export --data data/pile_val --out analysis_l2e
    l2e-analyze runs/base/export runs/l2e/export --labels baseline l2e --data data/pile_val --out compare
    l2e-analyze EleutherAI-pythia-70m/ --jsonl pile/val.jsonl.zst --tokenizer 20B_tokenizer.json --out pythia70m

Models: HF GPTNeoX directories (our exports, published Pythia checkpoints) or our training checkpoints. A run
directory with snapshots (a run's output_dir, its snapshots/, or an `l2e-convert to-hf --all` output) stands for
all its snapshots in step order, labelled LABEL/step<N>.
Data: a labelled .bin/.idx prefix from l2e-prepare-data (documents in a seeded random order), or Pile-format
jsonl files with --tokenizer (file order). Every model sees the same --max-tokens tokens, packed into rows of
--seq-length. Statistics and quantiles are exact over that sample; peak memory ~ 40 bytes per (token, neuron) pair
of one layer, ~1.3 GiB for 16k tokens x 2048 neurons (activations of all chosen layers go to float32 .npy
files under --scratch-dir first).
Writes analysis.json, scores.png, fkr.png and features.png (when the data has feature labels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import add_debug_flag, run_cli


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _warn_about_coverage(sample) -> None:
    """FKR compares a neuron's own feature with the others: say so when the sample cannot support it."""
    covered, known = sample.source["labels_covered"], len(sample.feature_names)
    if known and covered < 2:
        print(f"l2e-analyze: warning: the sample holds {covered} of the data's {known} features: FKR is "
              "undefined (null); raise --max-tokens or lower --doc-window", file=sys.stderr)
    elif covered < known:
        print(f"l2e-analyze: warning: the sample covers {covered} of {known} features; raise --max-tokens or "
              "lower --doc-window to cover them all", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from l2e_dist.analysis.monosemanticity import DEFAULT_EPS, DEFAULT_RATIOS
    from l2e_dist.analysis.samples import DEFAULT_DOC_WINDOW

    parser = argparse.ArgumentParser(prog="l2e-analyze", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="HF GPTNeoX directory or training checkpoint")
    parser.add_argument("--labels", nargs="+", help="one name per model (default: the directory names)")
    data = parser.add_argument_group("data (one of --data or --jsonl)")
    data.add_argument("--data", metavar="PREFIX", help="labelled .bin/.idx prefix (without extension)")
    data.add_argument("--jsonl", nargs="+", metavar="PATH", help="Pile-format jsonl(.zst/.gz) files or directories")
    data.add_argument("--tokenizer", help="tokenizer.json or SentencePiece .model for --jsonl")
    data.add_argument("--text-field", default="text", help="dotted text field for --jsonl (default: %(default)s)")
    data.add_argument("--label-field", default="meta.pile_set_name",
                      help="dotted feature-label field for --jsonl (default: %(default)s)")
    data.add_argument("--eod-token", help="end-of-document token name of the tokenizer, if unusual")
    data.add_argument("--max-tokens", type=int, default=16384, help="tokens analysed (default: %(default)s)")
    data.add_argument("--seq-length", type=int, default=2048, help="tokens per row (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0, help="document order seed for --data (default: %(default)s)")
    data.add_argument("--doc-window", type=int, default=DEFAULT_DOC_WINDOW,
                      help="tokens taken per document at most, so that the sample spans many documents and "
                           "every label (0 = whole documents; default: %(default)s)")
    parser.add_argument("--layers", default="all", help="all, mid2, mid_third or e.g. 2,3 (default: %(default)s)")
    parser.add_argument("--activation", choices=("post_act", "pre_act"), default="post_act",
                        help="MLP activation after (default) or before the GELU")
    parser.add_argument("--ratios", type=_floats, default=list(DEFAULT_RATIOS),
                        help="inhibition ratios p for thresholds and FKR (default: 0.5%%..10%%)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help="score denominator var + eps * mean var, as in training (default: %(default)s)")
    parser.add_argument("--reference-scores", type=_floats, default=[10.0],
                        help="fixed scores whose exceedance fraction is reported (default: 10)")
    parser.add_argument("--top-neurons", type=int, default=10, help="most selective neurons listed per layer")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="model compute dtype (activations are analysed in fp64 either way)")
    parser.add_argument("--out", default="analysis", help="output directory (default: %(default)s)")
    parser.add_argument("--scratch-dir", help="where activation files go during the run (default: --out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)
    return parser


@run_cli("l2e-analyze")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings(keep_freed_memory=False)  # THP for its large host tensors; it trains nothing
    import torch

    from l2e_dist.analysis.analyze import AnalysisError, AnalyzeSettings, run_analysis
    from l2e_dist.analysis.samples import sample_indexed, sample_jsonl
    from l2e_dist.checkpoint.snapshots import run_snapshots

    if bool(args.data) == bool(args.jsonl):
        raise AnalysisError("give the data as either --data PREFIX or --jsonl FILES (exactly one)")
    if args.jsonl and not args.tokenizer:
        raise AnalysisError("--jsonl needs --tokenizer (the tokenizer the models were trained with)")
    labels = args.labels or [Path(m).resolve().name for m in args.models]
    if len(labels) != len(args.models):
        raise AnalysisError(f"got {len(labels)} --labels for {len(args.models)} models: give one per model")
    models = []
    for label, model in zip(labels, args.models):  # a run directory stands for its snapshots, in step order
        snapshots = run_snapshots(model)
        models += [(f"{label}/step{step}", str(path)) for step, path in snapshots] or [(label, model)]
    seq_length = min(args.seq_length, args.max_tokens)
    if args.data:
        sample = sample_indexed(args.data, seq_length, args.max_tokens, args.seed, doc_window=args.doc_window)
    else:
        sample = sample_jsonl(args.jsonl, args.tokenizer, seq_length, args.max_tokens,
                              text_field=args.text_field, label_field=args.label_field or None,
                              eod_token=args.eod_token, doc_window=args.doc_window, seed=args.seed)
    _warn_about_coverage(sample)
    settings = AnalyzeSettings(
        layers=args.layers, activation=args.activation, eps=args.eps, ratios=args.ratios,
        reference_scores=args.reference_scores, top_neurons=args.top_neurons, batch_size=args.batch_size,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=args.dtype)
    report = run_analysis(models, sample, settings, args.out,
                          scratch_dir=args.scratch_dir, progress=not args.no_progress)
    data = report["data"]
    print(f"{data['tokens']} tokens ({data['rows']} x {data['seq_length']}), {len(data['feature_names'])} features, "
          f"{data['unknown_tokens']} unlabelled tokens")
    p = min(settings.ratios, key=lambda r: abs(r - 0.02))
    for model in report["models"]:
        for layer in model["layers"]:
            row = next(t for t in layer["thresholds"] if t["p"] == p)
            fkr = "n/a" if row["fkr"] is None else f"{row['fkr']:.3f}"
            top_ks = max((f["ks"] for f in layer["features"] if f["ks"] is not None), default=None)
            print(f"{model['label']} layer {layer['layer']}: tau(p={p:.1%}) = {row['tau']:.4g}, FKR = {fkr}, "
                  f"neurons selected {row['neurons_selected_frac']:.3f}, "
                  f"max K-S = {'n/a' if top_ks is None else f'{top_ks:.3f}'}")
    print(f"wrote {Path(args.out) / 'analysis.json'} and {', '.join(report['figures'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
