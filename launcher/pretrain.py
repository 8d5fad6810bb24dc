"""`l2e-pretrain`: pretrain a Pythia-style model (optionally with L2E) from YAML configs.

examples:
    l2e-pretrain --config configs/tiny.yaml                                   # -> runs/tiny-l2e
    l2e-pretrain --config configs/tiny.yaml --config configs/l2e/none.yaml    # its control -> runs/tiny
    l2e-pretrain --config configs/pythia-160m.yaml --config configs/l2e/l2e.yaml --optimizer.lr=3e-4
    l2e-pretrain --config configs/pythia-160m.yaml --set train.seed=2 --set train.output_dir=runs/160m-seed2
    l2e-pretrain --config configs/pythia-1b.yaml --dry-run --gpu-mem-gib 80     # checks + memory, no training
    deepspeed --num_gpus 8 --module launcher.pretrain --config configs/pythia-410m.yaml
    l2e-pretrain --config configs/pythia-410m.yaml --config configs/l2e/l2e.yaml --print-config  # resolved YAML

Launch with torchrun, the deepspeed launcher, srun or mpirun; ranks are discovered from the environment. Every
config key is listed in docs/configuration.md; `--section.key=value` is `--set section.key=value`. Started
again, a run resumes from its output directory (or reports that it is complete); a changed experiment key is
refused there: use another train.output_dir.
"""

from __future__ import annotations

import argparse
import sys

from launcher import add_debug_flag, dotted_overrides, quiet_known_warnings, report_user_error, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="l2e-pretrain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--config", action="append", required=True, help="YAML file; repeat to overlay")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override, e.g. train.seed=1 (also spelled --train.seed=1)"
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="check config, data, tokenizer, world and layout, print the memory estimate per rank, do not train",
    )
    parser.add_argument(
        "--gpu-mem-gib", type=float, default=None, metavar="GIB",
        help="with --dry-run: fail (exit 2) when the estimate per rank exceeds this device memory",
    )
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the merged, validated config (files + --set) as YAML and exit; starts no processes",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_debug_flag(parser)
    args = parser.parse_args(dotted_overrides(argv))
    if args.gpu_mem_gib is not None and not args.dry_run:
        parser.error("--gpu-mem-gib needs --dry-run")
    return args


@run_cli("l2e-pretrain")
def main(argv: list[str] | None = None) -> int:
    from l2e_dist.parallel.launcher_watch import watch_launcher

    watch_launcher()  # first, before the slow imports: a rank whose launcher dies exits with it
    args = parse_args(argv)
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # before the config's imports allocate the first tensor
    quiet_known_warnings()
    from l2e_dist.config import load_config
    from l2e_dist.errors import UserError, debug_requested

    try:
        cfg = load_config(args.config, args.set)
    except UserError as exc:
        exc.agreed = True  # every rank reads the same files: rank 0 alone reports it
        raise
    if args.print_config:
        import yaml

        from l2e_dist.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    import torch.distributed as dist

    from l2e_dist.parallel.state import destroy_process_groups
    from l2e_dist.training.dry_run import dry_run
    from l2e_dist.training.numerics import TrainingDiverged
    from l2e_dist.training.trainer import pretrain

    try:
        if args.dry_run:
            dry_run(cfg, args.gpu_mem_gib)
            return 0
        result = pretrain(cfg)
    except UserError as exc:
        exc.agreed = exc.agreed or not dist.is_initialized()  # before the process groups: same on every rank
        raise
    except TrainingDiverged as exc:  # the loss stayed non-finite (all-reduced: every rank agrees): exit 1
        if debug_requested() or args.debug:
            raise
        report_user_error("l2e-pretrain", str(exc))
        return 1
    finally:
        destroy_process_groups()
    if result.stopped_by_signal and not result.requeued:
        return 75  # EX_TEMPFAIL: stopped early with a checkpoint; run the same command again to resume
    return 0


if __name__ == "__main__":
    sys.exit(main())
