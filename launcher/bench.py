"""`l2e-bench`: time our training step (L2E off / L2E / MEmeL) against transformers' GPTNeoXForCausalLM.

    l2e-bench --config configs/tiny.yaml --rounds 40 --out runs/bench/tiny.json
    l2e-bench --config configs/pythia-70m.yaml --seq-length 128 --micro-batch-size 4 --out runs/bench/70m.json
    l2e-bench --config configs/pythia-410m.yaml --out runs/bench/410m.json      # on a GPU: bf16, MFU
    l2e-bench --config configs/tiny.yaml --variants none l2e --profile runs/bench/profile

One process (a world of 1); variants are interleaved round-robin and reported as medians and ratios
(JSON to --out, a table to stdout). Method details: l2e_dist/bench/__init__.py.
"""

from __future__ import annotations

import argparse
import sys

from launcher import add_debug_flag, dotted_overrides, quiet_known_warnings, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from l2e_dist.bench import VARIANTS

    parser = argparse.ArgumentParser(
        prog="l2e-bench",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--config", action="append", help="YAML file; repeat to overlay (default configs/tiny.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.seq_length=64 (also spelled --train.seq_length=64)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds (one step per variant)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps after L2E's late start")
    parser.add_argument("--seq-length", type=int, help="default: the config's (at most 128 on CPU)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the config's (at most 8 on CPU)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: 1 on CPU, torch's on GPU)")
    parser.add_argument("--batches", type=int, default=4, help="distinct random token batches, cycled")
    parser.add_argument("--no-memory-probe", action="store_true",
                        help="CPU: skip the per-variant peak-RSS runs in separate processes")
    parser.add_argument("--profile", metavar="DIR", help="also write torch.profiler tables/traces per variant")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", default="bench_train.json", help="JSON report (default: %(default)s)")
    add_debug_flag(parser)
    return parser.parse_args(dotted_overrides(argv))


@run_cli("l2e-bench")
def main(argv: list[str] | None = None) -> int:
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # the step it times is a training step: the settings of l2e-pretrain, set as early
    quiet_known_warnings()  # before parse_args, whose variant list imports megatron-core
    args = parse_args(argv)
    from l2e_dist.bench import BenchSettings, format_table, run_benchmark, write_report

    settings = BenchSettings(
        configs=args.config or ["configs/tiny.yaml"],
        overrides=args.set,
        variants=tuple(args.variants),
        rounds=args.rounds,
        warmup=args.warmup,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum,
        threads=args.threads,
        distinct_batches=args.batches,
        memory_probe=not args.no_memory_probe,
        profile_dir=args.profile,
        profile_steps=args.profile_steps,
    )
    report = run_benchmark(settings, progress=lambda message: print(f"l2e-bench: {message}", flush=True))
    write_report(report, args.out)
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
