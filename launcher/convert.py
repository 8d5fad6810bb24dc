"""`l2e-convert`: training checkpoints <-> Hugging Face GPTNeoX directories.

    l2e-convert to-hf runs/tiny hf/tiny                # any checkpoint (any ZeRO stage, any TP) -> HF directory
    l2e-convert to-hf runs/pythia-70m hf/pythia-70m --all   # every snapshot -> hf/pythia-70m/step0, step1, ...
    l2e-convert from-hf pythia-70m ckpt/pythia-70m-tp2 --tp 2   # HF GPTNeoX/Pythia -> our checkpoint at TP=2

CHECKPOINT may be a run's output_dir, its checkpoints/ directory (uses `latest`) or one checkpoint directory.
With --all, CHECKPOINT is a run's output_dir and OUT receives one HF directory per snapshot (train.save_schedule,
train.extra_save_steps), named by step like Pythia's revisions; steps already exported are skipped.
Continue pretraining from an imported model with `--set train.init_from=ckpt/pythia-70m-tp2` (weights only).
"""

from __future__ import annotations

import argparse
import sys

from launcher import add_debug_flag, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="l2e-convert", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="checkpoint -> Hugging Face GPTNeoXForCausalLM directory")
    to_hf.add_argument("checkpoint", help="run output_dir, checkpoints/ directory or checkpoint directory")
    to_hf.add_argument("out", help="output directory (must not exist or be empty; with --all: may hold earlier exports)")
    to_hf.add_argument("--all", action="store_true", help="every snapshot of the run -> OUT/step<N>")
    to_hf.add_argument("--max-shard-gib", type=float, default=5.0, help="safetensors shard size (default 5)")
    from_hf = sub.add_parser("from-hf", help="Hugging Face GPTNeoX directory -> our checkpoint at a TP size")
    from_hf.add_argument("hf_dir", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    from_hf.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    for command_parser in sub.choices.values():
        add_debug_flag(command_parser)
    return parser.parse_args(argv)


@run_cli("l2e-convert")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from l2e_dist.checkpoint.convert import export_hf, import_hf
    from l2e_dist.checkpoint.manifest import CheckpointError
    from l2e_dist.checkpoint.snapshots import export_snapshots_hf

    if args.command == "to-hf" and args.all:
        written, skipped = export_snapshots_hf(args.checkpoint, args.out, int(args.max_shard_gib * 2**30))
        print(f"l2e-convert: {len(written)} snapshots exported, {len(skipped)} already in {args.out}")
        return 0
    if args.command == "to-hf":
        out = export_hf(args.checkpoint, args.out, max_shard_bytes=int(args.max_shard_gib * 2**30))
    else:
        if args.tp < 1:
            raise CheckpointError(f"--tp must be >= 1, got {args.tp}")
        out = import_hf(args.hf_dir, args.out, tp=args.tp)
    print(f"l2e-convert: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
