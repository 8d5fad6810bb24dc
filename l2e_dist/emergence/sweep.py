"""A sweep: every (axis point, inhibition method, repeat) is one independent run, spread over a process pool;
then the skill-basis model is fitted on skill 1 per axis and method, and JSON plus figures are written."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from l2e_dist.config_utils import to_dict
from l2e_dist.emergence.config import EmergenceConfig
from l2e_dist.emergence.plots import plot_axis
from l2e_dist.emergence.skill_model import Axis, crossing_point, fit_theta, predict
from l2e_dist.emergence.tasks import SparseParityTasks
from l2e_dist.emergence.train import RunRecord, RunSpec, train_run
from l2e_dist.fileio import atomic_write_json

X_LABELS = {"time": "step T", "data": "training set size D", "width": "hidden width N"}


def plan_runs(cfg: EmergenceConfig) -> list[RunSpec]:
    """All runs of the sweep, the most expensive first so that the pool's tail is short."""
    specs: list[tuple[float, RunSpec]] = []
    for axis in cfg.axes:
        settings = cfg.axis_settings(axis)
        values: list[int | None]
        if axis == "time":
            values = [None]
        elif axis == "data":
            values = list(cfg.data_axis.sizes)
        else:
            values = list(cfg.width_axis.widths)
        for value in values:
            width = value if axis == "width" else settings.width
            batch = min(settings.batch_size, value) if axis == "data" else settings.batch_size
            cost = float(settings.steps) * batch * width
            for method in cfg.inhibition.methods:
                for repeat in range(cfg.repeats):
                    specs.append((cost, RunSpec(axis=axis, method=method, value=value, repeat=repeat)))
    specs.sort(key=lambda item: -item[0])
    return [spec for _, spec in specs]


def _worker_init() -> None:
    # Runs are independent single-threaded jobs: one thread per worker avoids oversubscribing the cores.
    torch.set_num_threads(1)


def _run(job: tuple[EmergenceConfig, RunSpec]) -> RunRecord:
    return train_run(*job)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def execute(cfg: EmergenceConfig, specs: list[RunSpec], log: bool = True) -> list[RunRecord]:
    """Run every spec; with more than one worker in a spawn-started pool (torch.set_num_threads(1) each)."""
    workers = min(cfg.workers or available_cpus(), len(specs))
    records: list[RunRecord] = []
    jobs = [(cfg, spec) for spec in specs]
    if workers <= 1:
        results = map(_run, jobs)
        pool = None
    else:
        # Spawned workers inherit the environment at start: OMP_NUM_THREADS=1 before their torch/BLAS load.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        results = pool.imap_unordered(_run, jobs)
    try:
        for record in results:
            records.append(record)
            if log:
                s = record.spec
                print(
                    f"[emergence] {len(records)}/{len(specs)} axis={s.axis} method={s.method} value={s.value} "
                    f"repeat={s.repeat} ({record.seconds:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    except BaseException:
        if pool is not None:
            pool.terminate()  # a failed run (or Ctrl-C) stops the sweep instead of waiting for the rest
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return records


def _dense_grid(axis: Axis, x: np.ndarray) -> np.ndarray:
    if axis == "data" and x.min() > 0:
        return np.geomspace(x.min(), x.max(), 300)
    return np.linspace(x.min(), x.max(), 300)


def summarize_axis(cfg: EmergenceConfig, axis: Axis, records: list[RunRecord]) -> dict[str, Any]:
    """Network curves, fitted model, prediction errors and emergence points for one axis, per method."""
    probs = SparseParityTasks(cfg.task).probs
    scale, r0, threshold = cfg.task.scale, cfg.skill_model.init_strength, cfg.skill_model.threshold
    out: dict[str, Any] = {"x_label": X_LABELS[axis], "methods": {}}
    for method in cfg.inhibition.methods:
        mine = [r for r in records if r.spec.axis == axis and r.spec.method == method]
        if axis == "time":
            mine.sort(key=lambda r: r.spec.repeat)
            x = np.asarray(mine[0].steps, dtype=np.float64)
            x_model = np.asarray(mine[0].effective_time, dtype=np.float64)
            runs = np.asarray([r.strengths for r in mine])  # [repeat, skill, x]
            losses = np.asarray([r.test_loss for r in mine])
        else:
            values = sorted({r.spec.value for r in mine})
            x = x_model = np.asarray(values, dtype=np.float64)
            by_key = {(r.spec.repeat, r.spec.value): r for r in mine}
            runs = np.asarray(
                [[[by_key[(rep, v)].strengths[k][-1] for v in values] for k in range(cfg.task.n_tasks)]
                 for rep in range(cfg.repeats)]
            )
            losses = np.asarray([[by_key[(rep, v)].test_loss[-1] for v in values] for rep in range(cfg.repeats)])
        mean = runs.mean(axis=0)
        theta = fit_theta(axis, x_model, mean[0], probs, scale, r0)
        model = predict(axis, x_model, theta, probs, scale, r0)
        x_dense = _dense_grid(axis, x)
        x_dense_model = np.interp(x_dense, x, x_model) if axis == "time" else x_dense
        model_dense = predict(axis, x_dense_model, theta, probs, scale, r0)
        out["x"] = x.tolist()
        out["methods"][method] = {
            "network": {"mean": mean.tolist(), "runs": runs.tolist()},
            "test_loss": {"mean": losses.mean(axis=0).tolist(), "runs": losses.tolist()},
            "theta": theta,
            "model": {"x_model": x_model.tolist(), "strengths": model.tolist()},
            "model_dense": {"x": x_dense.tolist(), "strengths": model_dense.tolist()},
            "prediction_error": {
                "rmse": np.sqrt(((model - mean) ** 2).mean(axis=1)).tolist(),
                "max_abs": np.abs(model - mean).max(axis=1).tolist(),
            },
            "emergence": {
                "mean_curve": [crossing_point(x, mean[k], threshold) for k in range(len(probs))],
                "runs": [[crossing_point(x, run[k], threshold) for run in runs] for k in range(len(probs))],
                "model": [crossing_point(x_dense, model_dense[k], threshold) for k in range(len(probs))],
            },
            "inhibitor_metrics": [r.inhibitor_metrics for r in sorted(mine, key=lambda r: (r.spec.repeat,
                                                                                           r.spec.value or 0))],
            "run_seconds": float(sum(r.seconds for r in mine)),
        }
    out["emergence_table"] = [
        {
            "skill": k + 1,
            "P_s": float(probs[k]),
            **{m: out["methods"][m]["emergence"]["runs"][k] for m in cfg.inhibition.methods},
        }
        for k in range(len(probs))
    ]
    return out


def format_emergence_table(summary: dict[str, Any]) -> str:
    """Plain-text table per axis: mean emergence point over the repeats where the skill emerged."""
    lines = []
    for axis, data in summary["axes"].items():
        methods = list(data["methods"])
        lines.append(f"{axis} axis: first {data['x_label']} with R_k/S >= threshold "
                     "(mean over repeats [emerged/repeats]); theta: "
                     + ", ".join(f"{m}={data['methods'][m]['theta']:.4g}" for m in methods))
        lines.append("skill  P_s     " + "".join(f"{m:>22}" for m in methods))
        for row in data["emergence_table"]:
            cells = []
            for m in methods:
                hits = [v for v in row[m] if v is not None]
                mean = f"{np.mean(hits):.5g}" if hits else "-"
                cells.append(f"{mean} [{len(hits)}/{len(row[m])}]")
            lines.append(f"{row['skill']:<6} {row['P_s']:<7.4f}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def run_sweep(cfg: EmergenceConfig, log: bool = True) -> dict[str, Any]:
    """Run the sweep, write `<output_dir>/emergence.json` (and figures) and return the summary."""
    start = time.perf_counter()
    tasks = SparseParityTasks(cfg.task)
    specs = plan_runs(cfg)
    records = execute(cfg, specs, log=log)
    summary: dict[str, Any] = {
        "config": to_dict(cfg),
        "skill_probs": tasks.probs.tolist(),
        "bit_sets": tasks.bit_sets.tolist(),
        "axes": {axis: summarize_axis(cfg, axis, records) for axis in cfg.axes},
        "runs": len(specs),
        "workers": min(cfg.workers or available_cpus(), len(specs)),
        "wall_seconds": time.perf_counter() - start,
    }
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary["figures"] = []
    if cfg.figures:
        for axis, data in summary["axes"].items():
            path = out_dir / f"emergence_{axis}.png"
            plot_axis(axis, data, path)
            summary["figures"].append(str(path))
    atomic_write_json(out_dir / "emergence.json", summary, sort_keys=False)
    return summary
