"""`l2e-eval`: lm-evaluation-harness on models across training: runs, snapshot folders, HF revision folders.

    l2e-eval runs/l2e runs/baseline --tasks piqa,arc_easy --steps 0,1000,143000 --out eval/
    l2e-eval runs/l2e pythia-160m-revisions/ --label l2e --label pythia --tasks piqa --num_fewshot 0
    l2e-eval hf/tiny/step8 --tasks tests/data/lm_eval_tasks/ --device cpu --out eval_tiny.json
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 l2e-eval runs/tiny --tasks tests/data/lm_eval_tasks/ --device cpu

Each input is a run's output_dir (every snapshot in snapshots/, else the latest checkpoint), a folder of step<N>
directories (an `l2e-convert to-hf --all` export, a local mirror of Pythia's revisions), or one HF/checkpoint
directory. Snapshots and checkpoints are converted to HF once into --cache-dir. The label of an input is its
directory name unless --label is given (once per input, in order). Writes under OUT: <label>/step<N>.json and
.csv (rows: run, step, task, metric, value, stderr), results.json/.csv (all rows), plots/<task>.png (each
metric against step, runs overlaid) with the plotted numbers in plots/<task>.json. An OUT ending in .json takes
one model and writes its table there (and .csv beside it). A step already evaluated with the same settings is
reused. lm-eval's flag spellings (--num_fewshot, --batch_size, --output_path, --log_samples) work too.

A task is a harness name (its dataset comes from the HF hub or the local HF cache) or a local task YAML file or
directory of them (data shipped next to it: runs offline); comma-separated or space-separated. Needs the `eval`
extra (lm-eval, accelerate). Details: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher import add_debug_flag, run_cli


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text}")
    return int(value) if value >= 1 else value


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be a positive integer or auto, got {text}")
    return int(text)


def _steps(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--steps takes comma-separated step numbers (0,1000,2000), got {text!r}")
    return [int(p) for p in parts]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2e-eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("models", nargs="+", metavar="RUN_OR_DIR",
                        help="run output_dir, folder of step<N> models, HF model directory or checkpoint directory")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="harness task names and/or local task YAMLs/dirs (comma- or space-separated)")
    parser.add_argument("--steps", type=_steps, help="comma-separated steps to evaluate (default: every step)")
    parser.add_argument("--label", action="append", help="series name of each input, in order (default: dir name)")
    parser.add_argument("--out", "--output_path", "--output-path", dest="out", default="eval_results",
                        help="output directory, or a .json file for one model (default: %(default)s)")
    parser.add_argument("--cache-dir", help="HF conversions of snapshots/checkpoints (default: OUT/hf-cache)")
    parser.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=None,
                        help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_batch_size, default=8,
                        help="an integer or auto (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="documents per task: a count, or a fraction < 1 (default: all)")
    parser.add_argument("--seed", type=int, default=1234, help="harness seeds (default: %(default)s)")
    parser.add_argument("--tokenizer", help="tokenizer directory when it is not in the model directory")
    parser.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                        help="store per-document results in the JSON tables")
    add_debug_flag(parser)
    return parser


@run_cli("l2e-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings(keep_freed_memory=False)  # THP for its large host tensors; it trains nothing
    from l2e_dist.analysis.eval_sweep import check_labels, discover, evaluate_models, write_sweep
    from l2e_dist.analysis.evaluate import EvalError, EvalSettings

    labels = args.label or []
    if labels and len(labels) != len(args.models):
        raise EvalError(f"{len(labels)} --label for {len(args.models)} inputs: give one --label per input, or none")
    sources = [s for i, path in enumerate(args.models)
               for s in discover(path, labels[i] if labels else None, args.steps)]
    check_labels(sources)
    out = Path(args.out)
    single_file = out.suffix == ".json"
    if single_file and len(sources) != 1:
        raise EvalError(f"--out {out} (a .json file) takes one model, the inputs hold {len(sources)}: give an "
                        "output directory")
    import torch

    settings = EvalSettings(tasks=args.tasks, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                            dtype=args.dtype, limit=args.limit, seed=args.seed, tokenizer=args.tokenizer,
                            log_samples=args.log_samples)
    base = out.parent if single_file else out
    cache_dir = Path(args.cache_dir) if args.cache_dir else base / "hf-cache"
    records = evaluate_models(sources, settings, cache_dir,
                              lambda s: out if single_file else out / s.label / f"{s.table_name}.json")
    if single_file:
        print(f"l2e-eval: wrote {out} and {out.with_suffix('.csv')}")
        return 0
    results_csv, plots = write_sweep(records, out)
    print(f"l2e-eval: wrote {len(records)} step tables under {out}/<label>/, {results_csv}, "
          f"{len(plots)} plot(s) in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
