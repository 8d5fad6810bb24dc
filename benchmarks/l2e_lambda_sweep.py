"""L2E trade-off: held-out monosemantic fraction vs LM loss for a sweep of reg_lambda (tiny config, CPU).

    python benchmarks/l2e_lambda_sweep.py --lambdas 0 1e-5 1e-4 1e-3 --steps 150 --nproc 1

Each run is a real `l2e-pretrain` (torchrun) with the same seed and data. Run 0 is L2E off (method none), whose
held-out figure is measured with the statistics L2E would have kept: a second run with lambda = 0 (statistics
and threshold tracked, no inhibition). Writes a JSON and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(lam: float, steps: int, nproc: int, out: Path, extra: list[str]) -> dict:
    overrides = {
        "l2e.method": "l2e",
        "l2e.reg_lambda": lam,
        "train.train_iters": steps,
        "train.eval_interval": steps,
        "train.eval_iters": 4,
        "train.save_interval": 0,
        "train.log_interval": max(1, steps // 10),
        "train.output_dir": str(out),
        "logging.progress_bar": False,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29700 + int(abs(hash((lam, str(out)))) % 200)),
           "-m", "launcher.pretrain", "--config", str(ROOT / "configs" / "tiny.yaml")]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    for item in extra:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if "valid/loss" in r][-1]
    train = [r for r in records if "train/loss" in r][-1]
    fracs = {k: v for k, v in valid.items() if k.endswith("frac_above_ref")}
    return {"lambda": lam, "valid_loss": valid["valid/loss"], "train_loss": train["train/loss"],
            "frac_above_ref": sum(fracs.values()) / len(fracs), "per_layer": fracs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    parser.add_argument("--output", default="l2e_lambda_sweep.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lam in enumerate(args.lambdas):
            rows.append(run(lam, args.steps, args.nproc, Path(tmp) / f"run{i}", args.set))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    print(f"\n| lambda | valid loss | d loss | held-out frac >= ref | vs lambda={base['lambda']:g} |")
    print("|---|---|---|---|---|")
    for r in rows:
        dl = (r["valid_loss"] - base["valid_loss"]) / base["valid_loss"]
        df = (r["frac_above_ref"] - base["frac_above_ref"]) / max(base["frac_above_ref"], 1e-12)
        print(f"| {r['lambda']:g} | {r['valid_loss']:.4f} | {dl:+.2%} | {r['frac_above_ref']:.5f} | {df:+.1%} |")
    Path(args.output).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
