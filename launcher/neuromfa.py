"""`l2e-neuromfa`: neuron-based multifractal analysis (NeuroMFA) of GPTNeoX checkpoints over training.

    l2e-neuromfa runs/a --out neuromfa_a                  # a run directory: all its snapshots, in step order
    l2e-neuromfa runs/a/step0 runs/a/step1000 runs/a/step2000 --out neuromfa_a
    l2e-neuromfa --run l2e runs/l2e --run baseline runs/base --out compare
    l2e-neuromfa --from-json neuromfa_a/neuromfa.json --run b runs/b/step* --out overlay

Checkpoints are HF GPTNeoX directories (config.json + safetensors) or our training checkpoints and snapshots
(any TP). A run directory (a run's output_dir, its snapshots/, or an `l2e-convert to-hf --all` output) stands
for all its snapshots (train.save_schedule=pythia). Steps come from the path (step1000, global_step1000,
iter_0001000, checkpoint-1000) or from --steps.
E(t) is measured against the run's step-0 snapshot (the initialization; found next to the given checkpoints
when not among them); without one, against the first checkpoint, with a warning naming its step.
Writes neuromfa.json, spectra.png (f(alpha) coloured by step) and metrics.png (alpha_0, width, E(t)).
"""

from __future__ import annotations

import argparse
import logging
import sys

from launcher import add_debug_flag, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="l2e-neuromfa",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="checkpoints of one run")
    parser.add_argument("--label", default="run", help="name of the positional checkpoints' run")
    parser.add_argument("--steps", type=int, nargs="+", help="step of each positional checkpoint, in order")
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "CHECKPOINT"),
        help="a named run and its checkpoints; repeat to overlay runs (e.g. L2E on/off)",
    )
    parser.add_argument(
        "--from-json",
        action="append",
        default=[],
        metavar="REPORT",
        help="overlay the runs of an earlier neuromfa.json (same settings)",
    )
    parser.add_argument("--out", default="neuromfa", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--distance",
        choices=("direct", "shortest"),
        default="direct",
        help="direct edges (authors' code, default) or directed shortest paths",
    )
    parser.add_argument("--samples", type=int, default=10, help="independent neuron samples per model")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (same neurons for every checkpoint)"
    )
    parser.add_argument("--hidden-per-layer", type=int, default=32, help="sampled neurons per h-wide layer")
    parser.add_argument("--intermediate-per-layer", type=int, default=64, help="sampled neurons per 4h layer")
    parser.add_argument("--q-min", type=float, default=-3.0)
    parser.add_argument("--q-max", type=float, default=3.0)
    parser.add_argument("--q-step", type=float, default=0.1)
    parser.add_argument("--min-distance", type=float, default=1.0, help="keep distances > this")
    parser.add_argument("--max-distance", type=float, default=150.0, help="keep distances <= this")
    parser.add_argument(
        "--min-neighbours", type=int, default=10, help="a node needs more distances than this"
    )
    parser.add_argument(
        "--with-partition", action="store_true", help="also store radii and ln Z_q(r) per sample"
    )
    add_debug_flag(parser)
    return parser.parse_args(argv)


@run_cli("l2e-neuromfa")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings(keep_freed_memory=False)  # THP for its large host tensors; it trains nothing
    from l2e_dist.analysis.neuromfa import NeuroMFASettings, checkpoint_steps, write_report
    from l2e_dist.analysis.neuromfa_network import NeuroMFAError
    from l2e_dist.config_utils import build

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = build(
        NeuroMFASettings,
        {
            "distance": args.distance,
            "num_samples": args.samples,
            "seed": args.seed,
            "hidden_per_layer": args.hidden_per_layer,
            "intermediate_per_layer": args.intermediate_per_layer,
            "q_min": args.q_min,
            "q_max": args.q_max,
            "q_step": args.q_step,
            "min_distance": args.min_distance,
            "max_distance": args.max_distance,
            "min_neighbours": args.min_neighbours,
        },
    )
    if args.steps and not args.checkpoints:
        raise NeuroMFAError(
            "--steps applies to positional checkpoints; --run paths need steps in their names"
        )
    runs = []
    if args.checkpoints:
        runs.append((args.label, checkpoint_steps(args.checkpoints, args.steps)))
    for label, *paths in args.run:
        if not paths:
            raise NeuroMFAError(
                f"--run {label} has no checkpoints; use --run LABEL CHECKPOINT [CHECKPOINT ...]"
            )
        runs.append((label, checkpoint_steps(paths)))
    write_report(runs, settings, args.out, args.from_json, args.with_partition)
    print(f"wrote {args.out}/neuromfa.json, spectra.png, metrics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
