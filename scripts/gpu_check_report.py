"""Assemble OUT_DIR/gpu_check.json from what scripts/gpu_check.sh left in OUT_DIR: the steps' exit codes and
times (steps.tsv), the in-process steps' JSONs (env, nccl, logits), each l2e-bench case's report (tokens/s, MFU,
peak memory, L2E overhead), the l2e-pretrain run's logged losses and the CUDA tests' junit XML; and each target
measured against its goal (`targets`). Exit 1 when a step failed or a correctness target (logits, NCCL, loss
falling) was missed; the performance targets (MFU, L2E overhead) are reported, met or not, without failing.

    python3 scripts/gpu_check_report.py OUT_DIR MODE WORK_DIR [--quiet]     # --quiet: after each step
"""

from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _tests(work: Path) -> dict:
    path = work / "cuda_tests.xml"
    if not path.is_file():
        return {"ran": False}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases.append({"name": case.get("name"), "status": status, "time_s": float(case.get("time", 0))})
    return {"ran": True, "cases": cases,
            "counts": {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}}


def _bench(path: Path) -> dict:
    report = json.loads(path.read_text())
    meta = report["meta"]
    variants = {
        name: {"tokens_per_s": v["tokens_per_s"], "mfu": v["mfu"], "step_time_s": v["step_time_s"]["median"],
               "peak_mem_gib": (v.get("peak_mem_bytes") or 0) / 2**30 or None}
        for name, v in report["variants"].items()
    }
    overhead = {key: r["of_medians"] - 1.0 for key, r in report["ratios"].items() if key in ("l2e/none", "memel/none")}
    return {"device_name": meta["device_name"], "params": meta["params"], "precision": meta["precision"],
            "seq_length": meta["seq_length"], "micro_batch_size": meta["micro_batch_size"],
            "peak_tflops": meta["peak_tflops"], "variants": variants, "overhead_vs_none": overhead}


def _pretrain(work: Path) -> dict:
    metrics = work / "pretrain" / "metrics.jsonl"
    if not metrics.is_file():
        return {"ok": False, "problem": "no metrics.jsonl"}
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [float(r["train/loss"]) for r in records if "train/loss" in r]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    falling = finite and len(losses) >= 2 and losses[-1] < losses[0]
    last = records[-1] if records else {}
    return {"ok": finite and falling, "losses": losses, "finite": finite, "falling": falling,
            "steps": last.get("step"), "tokens_per_s": last.get("train/tokens_per_s"), "mfu": last.get("train/mfu"),
            "max_mem_gib": last.get("train/max_mem_gib")}


MFU_GOAL = 0.45  # pythia-410m bf16 on one H100/H200
L2E_OVERHEAD_GOAL = 0.01  # of the step time


def _step_json(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("ok"):
        record.pop("traceback", None)
    return record


def _targets(report: dict) -> dict:
    """Each target as measured vs goal; `met` None when the check did not get to measure it."""
    targets = {}
    for case, bench in report["bench"].items():
        mfu = bench["variants"].get("none", {}).get("mfu")
        targets[f"mfu/{case}"] = {"measured": mfu, "goal": f">= {MFU_GOAL}", "params": bench["params"],
                                  "met": None if mfu is None else mfu >= MFU_GOAL}
        overhead = bench["overhead_vs_none"].get("l2e/none")
        targets[f"l2e_overhead/{case}"] = {"measured": overhead, "goal": f"<= {L2E_OVERHEAD_GOAL}",
                                           "met": None if overhead is None else overhead <= L2E_OVERHEAD_GOAL}
    logits, nccl, run = report["logits"], report["nccl"], report["pretrain"]
    targets["bf16_logits_vs_transformers"] = {
        "measured": None if logits is None else logits.get("ours_max_abs_error"),
        "goal": None if logits is None else logits.get("goal"), "met": None if logits is None else logits["ok"]}
    targets["nccl_world_of_1_and_l2e_reduction"] = {
        "measured": None if nccl is None else {k: nccl.get(k) for k in ("backend", "l2e_max_abs_difference")},
        "goal": "backend nccl (gloo on CPU), L2E state equal with and without the reduction",
        "met": None if nccl is None else nccl["ok"]}
    targets["loss_falling"] = {"measured": run.get("losses"), "goal": "finite, last < first",
                               "met": run["ok"] if run.get("losses") else None}
    return targets


def main(out_dir: str, mode: str, work_dir: str, quiet: bool = False) -> int:
    out, work = Path(out_dir), Path(work_dir)
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        name, rc, secs = line.split("\t")
        steps.append({"name": name, "rc": int(rc), "seconds": float(secs)})
    report = {"mode": mode, "steps": steps, "total_seconds": sum(s["seconds"] for s in steps),
              "env": _step_json(out, "env"), "nccl": _step_json(out, "nccl"), "logits": _step_json(out, "logits"),
              "cuda_tests": _tests(work),
              "bench": {p.stem: _bench(p) for p in sorted(out.glob("bench_*.json"))},
              "pretrain": _pretrain(work)}
    report["targets"] = _targets(report)
    failed = [s["name"] for s in steps if s["rc"] != 0]
    if not report["pretrain"]["ok"]:
        failed.append("pretrain:loss-not-finite-or-not-falling")
    for name in ("env", "nccl", "logits"):
        if report[name] is None or not report[name]["ok"]:
            failed.append(f"steps:{name}")
    report["failed"] = failed
    report["ok"] = not failed
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "gpu_check.json")
    if quiet:  # an interim report, after one step
        return 0 if report["ok"] else 1
    for name, target in report["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        print(f"gpu_check: target {name}: {verdict} (measured {target['measured']}, goal {target['goal']})")
    print(f"gpu_check: {'OK' if report['ok'] else 'FAILED ' + ', '.join(failed)} in {report['total_seconds']:.0f}s; "
          f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5) or sys.argv[4:] not in ([], ["--quiet"]):
        print("usage: gpu_check_report.py OUT_DIR MODE WORK_DIR [--quiet]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:4], quiet=len(sys.argv) == 5))
