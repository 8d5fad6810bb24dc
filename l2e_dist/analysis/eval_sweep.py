"""Evaluation across training (`l2e-eval RUN_OR_DIR ...`): every snapshot of a run, a folder of step<N> HF
directories (an `l2e-convert to-hf --all` export, or a local mirror of Pythia's revisions), or one model, with
lm-evaluation-harness; one table per (run, step) and one figure per task of each metric against step, the runs
overlaid (an L2E run, its control, Pythia's own revisions).

    models = discover("runs/l2e", label="l2e", steps=[0, 512, 1000])
    sweep = evaluate_models(models, settings, "eval/", cache_dir="eval/hf-cache")

Output under OUT:
    <label>/step<N>.json, .csv   one table per step (rows: run, step, task, metric, value, stderr) + the harness's
                                 record (settings, versions, n-samples, configs) and the source's identity
    results.json, results.csv    every row of every model
    plots/<task>.png, .json      metric against step per run (symlog x: Pythia's steps are log-spaced early)

Training snapshots/checkpoints are converted to HF once into a cache (checkpoint.convert.export_hf), keyed by
their manifest so a replaced snapshot is converted again. A (run, step) whose table already exists with the same
settings and the same source is not evaluated again: a sweep can be re-run as training proceeds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from l2e_dist.analysis.evaluate import (
    EvalError,
    EvalSettings,
    check_model_dir,
    evaluate,
    summarize,
    task_manager,
)
from l2e_dist.fileio import atomic_write_json, atomic_write_text

ROW_FIELDS = ("run", "step", "task", "metric", "value", "stderr")
_STEP_NAME = re.compile(r"^(?:global_)?step(\d+)$")


@dataclass(frozen=True)
class ModelSource:
    """One model to evaluate: an HF directory, or a training checkpoint/snapshot converted on the fly."""

    label: str
    step: int | None  # None: a single model whose step its name does not say
    path: Path
    is_hf: bool

    @property
    def table_name(self) -> str:
        return f"step{self.step}" if self.step is not None else "model"


def _step_of(path: Path) -> int | None:
    match = _STEP_NAME.match(path.name)
    return int(match[1]) if match else None


def _one_model(path: Path, label: str) -> ModelSource | None:
    from l2e_dist.checkpoint.convert import is_hf_directory

    if is_hf_directory(path) or (path / "config.json").is_file():
        return ModelSource(label, _step_of(path), path, is_hf=True)
    if any(path.glob("*_model_states.pt")):
        return ModelSource(label, _step_of(path), path, is_hf=False)
    return None


def default_label(path: str | Path) -> str:
    """A run's name: the directory's, or its parent's for a `snapshots` folder or a single step<N> model."""
    path = Path(path).resolve()
    return path.parent.name if path.name == "snapshots" or _step_of(path) is not None else path.name


def discover(path: str | Path, label: str | None = None, steps: Sequence[int] | None = None) -> list[ModelSource]:
    """The models `path` stands for: a run's output_dir (its snapshots, else its latest checkpoint), a folder of
    step<N> model directories, one HF directory or one checkpoint directory. `steps` selects among the step<N>
    directories (each must exist); a single model is taken whatever its step."""
    from l2e_dist.checkpoint.convert import resolve_checkpoint
    from l2e_dist.checkpoint.manifest import CheckpointError
    from l2e_dist.checkpoint.snapshots import list_snapshots

    path = Path(path)
    label = label or default_label(path)
    if not path.is_dir():
        raise EvalError(f"{path} does not exist: give a run output_dir, a folder of step<N> models or a model directory")
    found = {}
    for step, directory in list_snapshots(path):  # a run (its snapshots/) or a folder of step<N> models
        if (model := _one_model(directory, label)) is not None:
            found[step] = model
    if not found and not (path / "checkpoints").is_dir() and (single := _one_model(path, label)) is not None:
        return [single]
    if found:
        if steps is None:
            return [found[s] for s in sorted(found)]
        missing = sorted(set(steps) - set(found))
        if missing:
            raise EvalError(f"{path} has no step(s) {missing}: its steps are {sorted(found)}; fix --steps")
        return [found[s] for s in sorted(set(steps))]
    try:
        checkpoint = resolve_checkpoint(path)
    except CheckpointError:
        raise EvalError(f"{path} holds no model (not an HF model directory, no snapshots, no checkpoint): give a "
                        "run output_dir (snapshots/ or checkpoints/), a folder of step<N> model "
                        "directories, an HF model directory or a checkpoint directory") from None
    return [ModelSource(label, _step_of(checkpoint), checkpoint, is_hf=False)]


def source_identity(source: ModelSource) -> str:
    """What the model's weights are: a checkpoint's manifest hash, else the sizes and mtimes of its files."""
    manifest = source.path / "manifest.json"
    if not source.is_hf and manifest.is_file():
        return "manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.path.iterdir() if p.is_file())
    return "files:" + hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def hf_directory(source: ModelSource, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """The HF directory to evaluate: the source itself, or its export in `cache_dir` (made once per identity)."""
    if source.is_hf:
        return source.path
    from l2e_dist.checkpoint.convert import export_hf, is_hf_directory

    key = source_identity(source).split(":")[1][:16]
    target = cache_dir / source.label / f"{source.table_name}-{key}"
    if not is_hf_directory(target):
        export_hf(source.path, target)
        log(f"l2e-eval: converted {source.path} -> {target}")
    return target


def rows_of(results: dict[str, Any], label: str, step: int | None) -> list[dict[str, Any]]:
    """One row per (task, metric) of the harness's results; the filter is kept in the metric name unless it
    is "none" (acc, acc_norm, exact_match,strict-match)."""
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"run": label, "step": step, "task": task,
                         "metric": metric if filter_name == "none" else key, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_table(record: dict[str, Any], json_path: Path) -> None:
    """A step's record as JSON and its rows as CSV beside it (same stem)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, record, sort_keys=False, default=str)
    atomic_write_text(json_path.with_suffix(".csv"), rows_csv(record["rows"]))


def _record(results: dict[str, Any], source: ModelSource, model_dir: Path, settings: EvalSettings) -> dict:
    return {
        "run": source.label, "step": source.step, "source": str(source.path), "source_id": source_identity(source),
        "model": str(model_dir), "settings": asdict(settings),
        "rows": rows_of(results, source.label, source.step), "summary": summarize(results),
        "n-samples": results.get("n-samples"), "versions": results.get("versions"), "n-shot": results.get("n-shot"),
        "lm_eval_version": results.get("lm_eval_version"), "configs": results.get("configs"),
        **({"samples": results.get("samples")} if settings.log_samples else {}),
    }


def _reusable(path: Path, source: ModelSource, settings: EvalSettings) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = record.get("settings") == json.loads(json.dumps(asdict(settings))) and \
        record.get("source_id") == source_identity(source)
    return record if same else None


def evaluate_models(sources: list[ModelSource], settings: EvalSettings, cache_dir: str | Path,
                    table_path: Callable[[ModelSource], Path], log: Callable[[str], None] = print) -> list[dict]:
    """Evaluate each source (reusing an existing table of the same settings and source) and write its table at
    table_path(source); returns the records in order."""
    for source in sources:  # fail fast, before the harness indexes its tasks
        if source.is_hf:
            check_model_dir(source.path, settings.tokenizer)
    tasks = task_manager(settings.tasks)
    records = []
    for source in sources:
        path = table_path(source)
        where = f"{source.label} {source.table_name}"
        if (record := _reusable(path, source, settings)) is not None:
            log(f"l2e-eval: {where}: reused {path} (same settings and weights)")
        else:
            model_dir = hf_directory(source, Path(cache_dir), log)
            record = _record(evaluate(model_dir, settings, tasks), source, model_dir, settings)
            write_table(record, path)
        for task in sorted({r["task"] for r in record["rows"]}):
            shown = ", ".join(f"{r['metric']} {r['value']:.4f}" for r in record["rows"] if r["task"] == task)
            log(f"l2e-eval: {where}: {task}: {shown}")
        records.append(record)
    return records


def check_labels(sources: list[ModelSource]) -> None:
    """Two inputs may not share a label (their tables and plot series would collide)."""
    seen: dict[tuple[str, str], Path] = {}
    for source in sources:
        key = (source.label, source.table_name)
        if key in seen and seen[key] != source.path:
            raise EvalError(f"{seen[key]} and {source.path} are both labelled {source.label!r} "
                            f"({source.table_name}): give each input its own --label")
        seen[key] = source.path


# ------------------------------------------------------------------------------------------- figures
def task_series(rows: list[dict[str, Any]], task: str) -> dict[str, dict[str, dict[str, list]]]:
    """{metric: {run: {"steps", "values", "stderr"}}} of one task, by step; rows without a step are left out."""
    series: dict[str, dict[str, dict[str, list]]] = {}
    for row in sorted((r for r in rows if r["task"] == task and r["step"] is not None), key=lambda r: r["step"]):
        line = series.setdefault(row["metric"], {}).setdefault(row["run"], {"steps": [], "values": [], "stderr": []})
        line["steps"].append(row["step"])
        line["values"].append(row["value"])
        line["stderr"].append(row["stderr"])
    return series


def task_figure(rows: list[dict[str, Any]], task: str):
    """One axis per metric of `task`, one line per run (markers at the evaluated steps, +-stderr band); x is
    symlog so step 0 and Pythia's log-spaced early steps are visible next to step 143000."""
    from matplotlib.figure import Figure

    series = task_series(rows, task)
    metrics = sorted(series)
    figure = Figure(figsize=(5.0 * max(len(metrics), 1), 3.6), layout="constrained")
    axes = figure.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for run, line in series[metric].items():
            (drawn,) = ax.plot(line["steps"], line["values"], marker="o", label=run)
            if all(e is not None for e in line["stderr"]):
                low = [v - e for v, e in zip(line["values"], line["stderr"])]
                high = [v + e for v, e in zip(line["values"], line["stderr"])]
                ax.fill_between(line["steps"], low, high, color=drawn.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("symlog", linthresh=1)
        steps = sorted({s for line in series[metric].values() for s in line["steps"]})
        if len(steps) <= 12:  # few steps: label each (symlog's own ticks may show none between 1 and 10)
            ax.set_xticks(steps, labels=[str(s) for s in steps])
        ax.set(xlabel="step", ylabel=metric, title=f"{task}: {metric}")
        ax.legend(fontsize="small")
    return figure


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """plots/<task>.png and the plotted numbers as plots/<task>.json, one per task."""
    from l2e_dist.analysis.plots import save_png

    written = []
    for task in sorted({r["task"] for r in rows}):
        png = out_dir / f"{task}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png(task_figure(rows, task), png)
        atomic_write_json(png.with_suffix(".json"), {"task": task, "metrics": task_series(rows, task)},
                          sort_keys=False)
        written.append(png)
    return written


def write_sweep(records: list[dict], out_dir: Path) -> tuple[Path, list[Path]]:
    """results.json / results.csv (every row) and the per-task figures; returns (results.csv, PNGs)."""
    rows = [row for record in records for row in record["rows"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {"rows": rows, "models": [
        {k: record[k] for k in ("run", "step", "source", "model")} for record in records]}, sort_keys=False)
    csv_path = atomic_write_text(out_dir / "results.csv", rows_csv(rows))
    return csv_path, write_plots(rows, out_dir / "plots")
