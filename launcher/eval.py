"""`l2e-eval`: evaluate an exported HF model with lm-evaluation-harness (task names or local task files).

    l2e-eval runs/l2e/export --tasks arc_challenge arc_easy piqa --out eval_l2e.json
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 l2e-eval export/ --tasks tests/data/lm_eval_tasks/ --device cpu

A task is a harness name (its dataset comes from the HF hub or the local HF cache) or a local task YAML file or
directory of them (data shipped next to it: runs offline). Needs the `eval` extra (lm-eval, accelerate).
Writes a JSON with the per-task metrics (summary), the harness's task configs and versions; prints the summary.
"""

from __future__ import annotations

import argparse
import sys

from launcher import add_debug_flag, run_cli


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(value) if value >= 1 else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2e-eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("model", help="HF model directory (config.json, weights, tokenizer)")
    parser.add_argument("--tasks", nargs="+", required=True, help="harness task names and/or local task YAMLs/dirs")
    parser.add_argument("--out", default="eval_results.json", help="results JSON (default: %(default)s)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="documents per task: a count, or a fraction < 1 (default: all)")
    parser.add_argument("--seed", type=int, default=1234, help="harness seeds (default: %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer directory when it is not in the model directory")
    parser.add_argument("--log-samples", action="store_true", help="store per-document results in the JSON")
    add_debug_flag(parser)
    return parser


@run_cli("l2e-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from l2e_dist.analysis.evaluate import EvalSettings, evaluate, write_results

    settings = EvalSettings(tasks=args.tasks, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            dtype=args.dtype, limit=args.limit, seed=args.seed, tokenizer=args.tokenizer,
                            log_samples=args.log_samples)
    results = evaluate(args.model, settings)
    record = write_results(results, args.model, settings, args.out)
    for task, metrics in record["summary"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
        print(f"{task}: {shown} (n={record['n-samples'][task]['effective']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
