"""`l2e-convert`: training checkpoints <-> Hugging Face GPTNeoX directories.

    l2e-convert to-hf runs/tiny hf/tiny                # any checkpoint (any ZeRO stage, any TP) -> HF directory
    l2e-convert to-hf runs/pythia-70m hf/pythia-70m --all   # every snapshot -> hf/pythia-70m/step0, step1, ...
    l2e-convert to-hf runs/pythia-70m hf/pythia-70m --all --git --dtype float16   # one git repo, Pythia's layout
    l2e-convert from-hf pythia-70m ckpt/pythia-70m-tp2 --tp 2   # HF GPTNeoX/Pythia -> our checkpoint at TP=2
    l2e-convert from-neox neox-ckpt-pythia-70m/global_step13000 ckpt/p70m-13000 --tp 1   # + optimizer state

CHECKPOINT may be a run's output_dir, its checkpoints/ directory (uses `latest`) or one checkpoint directory.
With --all, CHECKPOINT is a run's output_dir and OUT receives one HF directory per snapshot (train.save_schedule,
train.extra_save_steps), named by step like Pythia's revisions; steps already exported are skipped. With --all --git,
OUT is one git repository with a step<N> branch per snapshot and main at the last step, weights in git-lfs, as
Pythia's hub repositories are: push it with `git -C OUT push REMOTE --all` (docs/publishing.md).
Continue pretraining from an imported model with `--set train.init_from=ckpt/pythia-70m-tp2` (weights only).
A gpt-neox `global_stepN` directory (or its from-neox output) in train.init_from also continues its optimizer
(docs/neox-checkpoints.md).
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
    to_hf.add_argument("--git", action="store_true",
                       help="with --all: OUT is one git repository, a step<N> branch per snapshot, main = last step")
    to_hf.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="weight dtype of the export (Pythia publishes float16; default: %(default)s)")
    to_hf.add_argument("--max-shard-gib", type=float, default=5.0, help="safetensors shard size (default 5)")
    from_hf = sub.add_parser("from-hf", help="Hugging Face GPTNeoX directory -> our checkpoint at a TP size")
    from_hf.add_argument("hf_dir", help="directory with config.json and model.safetensors (or pytorch_model.bin)")
    from_hf.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    from_neox = sub.add_parser("from-neox", help="gpt-neox global_stepN directory -> our checkpoint with optimizer state")
    from_neox.add_argument("neox_dir", help="a gpt-neox/DeeperSpeed global_stepN directory (layer_*, mp_rank_*, zero_pp_*)")
    from_neox.add_argument("out", help="output checkpoint directory (must not exist or be empty)")
    from_neox.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    for command_parser in sub.choices.values():
        add_debug_flag(command_parser)
    return parser.parse_args(argv)


@run_cli("l2e-convert")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings(keep_freed_memory=False)  # THP for its large host tensors; it trains nothing
    from l2e_dist.checkpoint.convert import export_hf, import_hf
    from l2e_dist.checkpoint.hf_git import export_snapshots_git
    from l2e_dist.checkpoint.manifest import CheckpointError
    from l2e_dist.checkpoint.snapshots import export_snapshots_hf

    if args.command == "to-hf" and args.git and not args.all:
        raise CheckpointError("--git writes every snapshot as a branch: add --all")
    shard_bytes = int(args.max_shard_gib * 2**30) if args.command == "to-hf" else 0
    if args.command == "to-hf" and args.git:
        written, skipped = export_snapshots_git(args.checkpoint, args.out, args.dtype, shard_bytes)
        print(f"l2e-convert: {len(written)} snapshots committed, {len(skipped)} already branches of {args.out}; "
              f"main = the last step. Publish: git -C {args.out} push REMOTE --all")
        return 0
    if args.command == "to-hf" and args.all:
        written, skipped = export_snapshots_hf(args.checkpoint, args.out, shard_bytes, dtype=args.dtype)
        print(f"l2e-convert: {len(written)} snapshots exported, {len(skipped)} already in {args.out}")
        return 0
    if args.command == "to-hf":
        out = export_hf(args.checkpoint, args.out, max_shard_bytes=shard_bytes, dtype=args.dtype)
    elif args.command == "from-neox":
        from l2e_dist.checkpoint.neox_convert import import_neox

        out = import_neox(args.neox_dir, args.out, tp=args.tp)
    else:
        if args.tp < 1:
            raise CheckpointError(f"--tp must be >= 1, got {args.tp}")
        out = import_hf(args.hf_dir, args.out, tp=args.tp)
    print(f"l2e-convert: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
