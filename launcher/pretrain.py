"""`l2e-pretrain`: pretrain a Pythia-style model (optionally with L2E) from YAML configs.

    l2e-pretrain --config configs/tiny.yaml --config configs/l2e/l2e.yaml --set optimizer.lr=3e-4

Launch with torchrun, the deepspeed launcher, srun or mpirun; ranks are discovered from the environment.
"""

from __future__ import annotations

import argparse
import sys

from launcher import quiet_known_warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="l2e-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", required=True, help="YAML file; repeat to overlay")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.seed=1"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_known_warnings()
    from l2e_dist.config import load_config
    from l2e_dist.config_utils import ConfigError

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as exc:
        print(f"l2e-pretrain: {exc}", file=sys.stderr)
        return 2
    from l2e_dist.checkpoint.io import CheckpointError
    from l2e_dist.l2e.inhibitor import NonFiniteActivations
    from l2e_dist.parallel.state import destroy_process_groups
    from l2e_dist.training.trainer import pretrain

    try:
        result = pretrain(cfg)
    except (ConfigError, CheckpointError, NonFiniteActivations) as exc:  # world size, checkpoints, L2E NaN/inf
        print(f"l2e-pretrain: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy_process_groups()
    if result.stopped_by_signal and not result.requeued:
        return 75  # EX_TEMPFAIL: stopped early with a checkpoint; run the same command again to resume
    return 0


if __name__ == "__main__":
    sys.exit(main())
