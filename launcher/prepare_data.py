"""l2e-prepare-data: tokenize raw text (The Pile format) into Megatron .bin/.idx files, or train a tokenizer.

  l2e-prepare-data tokenize --input pile/train/00.jsonl.zst --tokenizer 20B_tokenizer.json \\
      --output-prefix data/pile_00 --workers 16 --verify
  l2e-prepare-data tokenize --hf-dataset monology/pile-uncopyrighted --hf-data-files train/00.jsonl.zst ...
  l2e-prepare-data train-tokenizer --input corpus/ --output tok.model --vocab-size 32000
  l2e-prepare-data batch --config configs/pythia-160m.yaml --config configs/data/pythia_deduped_preshuffled.yaml \
      --step 13000 --out batch13000.npy

`batch` writes the token ids [global_batch_size, seq_length + 1] of the global batch that training consumes at
step I (0-based: the batch optimizer step I + 1 trains on, i.e. the first batch of a run resumed or branched at
step I; Pythia's utils/batch_viewer.py numbering), from the same code the trainer uses, for any data mode.

Re-running an interrupted `tokenize` with the same arguments resumes it (the output is byte-identical to an
uninterrupted run); with the output already complete it only verifies (--verify) and reports.
"""

from __future__ import annotations

import argparse
import os
import sys

from l2e_dist.data.prepare import PrepareOptions, prepare, train_tokenizer
from l2e_dist.data.sources import InputError, SourceSpec, expand_inputs
from launcher import add_debug_flag, dotted_overrides, run_cli


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input (local files, or a `datasets` name)")
    group.add_argument("--input", nargs="+", default=[], metavar="PATH",
                       help="jsonl / jsonl.zst / jsonl.gz / parquet files, directories or globs, read in this order")
    group.add_argument("--hf-dataset", help="a name for datasets.load_dataset (streamed), e.g. a hub dataset or 'json'")
    group.add_argument("--hf-config", help="dataset configuration name")
    group.add_argument("--hf-split", default="train", help="dataset split (default: train)")
    group.add_argument("--hf-data-files", nargs="+", default=[], help="data_files for load_dataset")
    parser.add_argument("--text-field", default="text", help="dotted path of the text (default: text)")
    parser.add_argument("--on-bad-record", choices=["fail", "skip"], default="fail",
                        help="malformed JSON / missing or non-string text: fail with file:line (default) or skip "
                             "and count")


def _source(args: argparse.Namespace) -> SourceSpec:
    if bool(args.input) == bool(args.hf_dataset):
        raise InputError("give either --input files or --hf-dataset (exactly one)")
    if args.hf_dataset:
        return SourceSpec(hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                          hf_data_files=args.hf_data_files)
    return SourceSpec(files=expand_inputs(args.input))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2e-prepare-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenize", help="raw documents -> .bin/.idx + label sidecar (resumable)")
    _add_source_args(tok)
    tok.add_argument("--tokenizer", required=True, help="HF tokenizer.json (Pythia: GPT-NeoX-20B) or SentencePiece "
                                                        ".model")
    tok.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.labels.*/.meta.json")
    tok.add_argument("--label-field", default="meta.pile_set_name",
                     help="dotted path of the per-document feature label for FKR ('' for none; default: "
                          "meta.pile_set_name)")
    tok.add_argument("--eod-token", help="end-of-document token name if not <|endoftext|>, </s>, <eos>, ...")
    tok.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto",
                     help="token dtype: auto = uint16 when the vocabulary fits (as GPT-NeoX), else int32")
    tok.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all "
                                                                              "cores)")
    tok.add_argument("--chunk-docs", type=int, default=4096,
                     help="records per resumable chunk (part of the output identity; keep it when resuming)")
    tok.add_argument("--verify", action="store_true", help="read the whole output back and check it")
    tok.add_argument("--overwrite", action="store_true", help="discard an existing or unfinished output")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = commands.add_parser("train-tokenizer", help="train a SentencePiece model on a sample of the inputs")
    _add_source_args(train)
    train.add_argument("--output", required=True, help="path of the .model file to write")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--sample-docs", type=int, default=100_000, help="train on the first N documents")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    batch = commands.add_parser("batch", help="token ids of the global batch training consumes at step I")
    batch.add_argument("--config", action="append", required=True, help="run YAML file; repeat to overlay")
    batch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override, e.g. train.seed=1 (also spelled --train.seed=1)")
    batch.add_argument("--step", type=int, required=True, help="0-based step I (the batch after checkpoint stepI)")
    batch.add_argument("--split", choices=["train", "valid", "test"], default="train")
    batch.add_argument("--out", help="write an int64 .npy [global_batch_size, seq_length + 1] here (atomically) "
                                     "instead of printing one sample per line")
    maps = commands.add_parser("index-maps", help="GPT-NeoX's doc/sample/shuffle index maps of a seed's data order "
                                                  "(data.order=pythia_index_maps; docs/polypythia.md)")
    maps.add_argument("--input", required=True, help=".bin/.idx prefix of the unshuffled corpus (no extension)")
    maps.add_argument("--output-dir", required=True, help="writes <name>_train_0_indexmap_<N>ns_<L>sl_<seed>s_*.npy")
    maps.add_argument("--seed", type=int, required=True, help="GPT-NeoX's seed (Pythia: 1234; PolyPythia seedN: N)")
    maps.add_argument("--num-samples", type=int, default=147164160, help="samples requested (Pythia's maps: "
                                                                          "147164160)")
    maps.add_argument("--seq-length", type=int, default=2048)
    maps.add_argument("--split", help="only this split's documents, e.g. '969,30,1' (GPT-NeoX data-path + split); "
                                      "default: every document (train-data-paths, as Pythia)")
    for command_parser in commands.choices.values():
        add_debug_flag(command_parser)
    return parser


def show_batch(args: argparse.Namespace) -> int:
    """`batch`: build the run's datasets exactly as the trainer does and print or save one global batch."""
    from l2e_dist.config import load_config
    from l2e_dist.errors import UserError
    from l2e_dist.fileio import atomic_save_npy
    from launcher import quiet_known_warnings

    quiet_known_warnings()
    from l2e_dist.training.run_data import global_batch_tokens

    cfg = load_config(args.config, args.set)
    tokens = global_batch_tokens(cfg, args.step, args.split)
    if args.out:
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise UserError(f"--out {out}: its directory does not exist: create it or choose another path")
        atomic_save_npy(out, tokens)
        print(f"{out}: {args.split} global batch of step {args.step}, {tokens.shape[0]} samples x "
              f"{tokens.shape[1]} tokens")
    else:
        for row in tokens:
            print(" ".join(map(str, row.tolist())))
    return 0


@run_cli("l2e-prepare-data")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(dotted_overrides(argv))
    if args.command == "batch":
        return show_batch(args)
    if args.command == "index-maps":
        from launcher import quiet_known_warnings

        quiet_known_warnings()
        from l2e_dist.data.index_map_build import write_index_maps

        files = write_index_maps(args.input, args.output_dir, num_samples=args.num_samples,
                                 seq_length=args.seq_length, seed=args.seed, split=args.split)
        print(f"wrote {files.prefix}_{{doc,sample,shuffle}}_idx.npy: set data.index_maps={args.output_dir}")
        return 0
    source = _source(args)
    if args.command == "train-tokenizer":
        used = train_tokenizer(source, args.output, args.vocab_size, args.sample_docs, args.text_field,
                               args.on_bad_record, args.model_type)
        print(f"trained {args.output} (vocab {args.vocab_size}) on {used} documents")
        return 0
    summary = prepare(PrepareOptions(
        output_prefix=args.output_prefix, tokenizer=args.tokenizer, source=source, text_field=args.text_field,
        label_field=args.label_field or None, eod_token=args.eod_token, dtype=args.dtype,
        on_bad_record=args.on_bad_record, chunk_docs=args.chunk_docs, workers=args.workers,
        verify=args.verify, progress=not args.no_progress, overwrite=args.overwrite))
    line = f"{summary['prefix']}: {summary['documents']} documents, {summary['tokens']} tokens ({summary['dtype']})"
    if "seconds" in summary:
        line += (f"; tokenized {summary['new_documents']} documents in {summary['seconds']:.1f} s "
                 f"({summary['docs_per_s']:,.0f} docs/s, {summary['tokens_per_s']:,.0f} tokens/s)")
    else:
        line += "; already complete"
    print(line)
    skipped = summary["skipped"]
    print(f"skipped: {skipped['empty_documents']} empty documents, {skipped['bad_records']} bad records; "
          f"{summary['missing_label']} documents without a label")
    for example in summary["bad_examples"]:
        print(f"  bad record: {example}")
    if "verified" in summary:
        print(f"verified: {summary['verified']['documents']} documents, {summary['verified']['tokens']} tokens read "
              "back, checksums match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
