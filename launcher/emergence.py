"""`l2e-emergence`: multitask sparse parity emergence sweep with the skill-basis model (and L2E on/off).

    l2e-emergence --config configs/emergence/time_small.yaml
    l2e-emergence --config configs/emergence/time_small.yaml --set inhibition.methods=[none,l2e] --set repeats=4

Runs every (axis point, inhibition method, repeat) in a pool of worker processes, fits the skill-basis model
on skill 1 per axis and method, and writes <output_dir>/emergence.json and emergence_<axis>.png.
"""

from __future__ import annotations

import argparse
import sys

from launcher import add_debug_flag, dotted_overrides, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="l2e-emergence", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--config", help="YAML sweep config (configs/emergence/*.yaml); defaults if omitted")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config entry, e.g. --set time_axis.steps=4000 or --time_axis.steps=4000 "
                        "(repeatable)")
    add_debug_flag(parser)
    return parser.parse_args(dotted_overrides(argv))


@run_cli("l2e-emergence")
def main(argv: list[str] | None = None) -> int:
    from l2e_dist.parallel.host_memory import apply_process_settings

    # THP only: the sweep trains in spawned workers, which inherit THP through the environment but not a
    # process's malloc settings.
    apply_process_settings(keep_freed_memory=False)
    args = parse_args(argv)
    from l2e_dist.emergence.config import load_config
    from l2e_dist.emergence.sweep import format_emergence_table, run_sweep

    cfg = load_config(args.config, args.overrides)
    summary = run_sweep(cfg)
    print(format_emergence_table(summary))
    for axis, data in summary["axes"].items():
        for method, result in data["methods"].items():
            errors = ", ".join(f"{e:.3f}" for e in result["prediction_error"]["rmse"])
            print(f"{axis}/{method}: theta={result['theta']:.4g}; model-vs-network RMSE per skill: {errors}")
    print(f"wrote {cfg.output_dir}/emergence.json" + "".join(f", {p}" for p in summary["figures"])
          + f" ({summary['runs']} runs on {summary['workers']} workers, {summary['wall_seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
