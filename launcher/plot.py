"""`l2e-plot`: compare training runs (e.g. L2E on/off) from their TensorBoard logs in one PNG.

    l2e-plot runs/baseline runs/l2e --out compare.png
    l2e-plot runs/a runs/b --labels "L2E off" "L2E on" --smooth 0.6 --title "Pythia-70M, 2% Mid-2"

A run is a training output directory (events under <run>/tensorboard/, else metrics.jsonl) or a directory of
event files. The figure shows train/valid loss and the learning rate, then one row per per-layer L2E scalar the
runs logged (threshold, selected_frac, fkr, mean_score, reg, held-out frac_above_ref), one panel per layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import add_debug_flag, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2e-plot", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run output directory or event-file directory")
    parser.add_argument("--labels", nargs="+", help="one name per run (default: the directory names)")
    parser.add_argument("--out", default="runs.png", help="output PNG (default: %(default)s)")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="TensorBoard-style EMA weight in [0, 1) for the curves (default: %(default)s)")
    parser.add_argument("--title", help="figure title")
    add_debug_flag(parser)
    return parser


@run_cli("l2e-plot")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from l2e_dist.analysis.plots import plot_runs, save_png
    from l2e_dist.analysis.runlogs import RunLogError, load_scalars

    if not 0.0 <= args.smooth < 1.0:
        raise RunLogError(f"--smooth must be in [0, 1), got {args.smooth}")
    labels = args.labels or [Path(r).resolve().name for r in args.runs]
    if len(labels) != len(args.runs) or len(set(labels)) != len(labels):
        raise RunLogError(f"give one unique --labels entry per run (got {labels} for {len(args.runs)} runs)")
    runs = {label: load_scalars(run) for label, run in zip(labels, args.runs)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(plot_runs(runs, smooth=args.smooth, title=args.title), out)
    for label, scalars in runs.items():
        last = scalars.get("train/loss")
        tail = f", last train/loss {last[1][-1]:.4f} at step {last[0][-1]}" if last else ""
        print(f"{label}: {len(scalars)} scalar tags{tail}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
