"""Zero-/few-shot evaluation of an exported HF model with lm-evaluation-harness (`lm_eval.simple_evaluate`).

Tasks are harness task names (arc_challenge, piqa, ...: their datasets come from the HF hub or its cache) or
local task YAML files / directories of them (read through `TaskManager(include_path=...)`, so a local task with
local data runs fully offline, e.g. with HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1). When every task is local,
the harness's own task index is not scanned (faster start).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from l2e_dist.errors import UserError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class EvalError(UserError, ValueError):
    """A user-facing problem with the evaluation inputs (one line, with the fix)."""


@dataclass
class EvalSettings:
    tasks: list[str]
    num_fewshot: int | None = None
    batch_size: int | str = 8  # or lm-eval's "auto" / "auto:N"
    device: str = "cpu"
    dtype: str = "float32"
    limit: float | None = None  # per task: a count (>= 1) or a fraction (< 1) of the documents
    seed: int = 1234
    tokenizer: str | None = None  # default: the model directory
    log_samples: bool = False


class _TaskLoader(yaml.SafeLoader):
    """Reads task YAMLs that use the harness's `!function module.name` tag (we only need the task name)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_names_in(path: Path) -> list[str]:
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    names = []
    for file in files:
        try:
            config = yaml.load(file.read_text(), Loader=_TaskLoader)
        except (OSError, yaml.YAMLError) as exc:
            raise EvalError(f"cannot read task file {file}: {exc}") from None
        if isinstance(config, dict) and isinstance(config.get("task"), str):
            names.append(config["task"])
    if not names:
        raise EvalError(f"no lm-eval task (a YAML with a `task:` name) in {path}")
    return names


def split_task_specs(specs: list[str]) -> list[str]:
    """`--tasks piqa,arc_easy` (lm-eval's spelling) and `--tasks piqa arc_easy` alike."""
    return [part.strip() for spec in specs for part in spec.split(",") if part.strip()]


def resolve_tasks(specs: list[str]) -> tuple[list[str], list[str]]:
    """(task names, include paths): a spec that is an existing .yaml file or directory is a local task."""
    names, include = [], []
    for spec in split_task_specs(specs):
        path = Path(spec)
        if path.is_dir() or (path.is_file() and path.suffix in (".yaml", ".yml")):
            names += _task_names_in(path)
            include.append(str((path if path.is_dir() else path.parent).resolve()))
        elif spec.endswith((".yaml", ".yml")) or os.sep in spec:
            raise EvalError(f"task file not found: {spec}")
        else:
            names.append(spec)
    return names, sorted(set(include))


def check_model_dir(model_dir: str | Path, tokenizer: str | None) -> None:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise EvalError(f"{path} is not an HF model directory (no config.json): export the checkpoint to HF "
                        "format first")
    tokenizer_dir = Path(tokenizer) if tokenizer else path
    if not any((tokenizer_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise EvalError(f"no tokenizer in {tokenizer_dir} (none of {', '.join(_TOKENIZER_FILES)}): save one "
                        "with the model or pass --tokenizer DIR")


def task_manager(specs: list[str]) -> tuple[list[str], Any]:
    """(task names, lm-eval TaskManager) for the task specs; unknown names are one EvalError line. Built once
    per evaluation sweep: indexing the harness's tasks takes seconds."""
    names, include = resolve_tasks(specs)
    from lm_eval.tasks import TaskManager

    local_only = all(Path(spec).exists() for spec in split_task_specs(specs))
    manager = TaskManager(include_path=include or None, include_defaults=not local_only)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s) {unknown}: use harness task names (`lm-eval ls tasks`) or local "
                        "task YAML files")
    return names, manager


def evaluate(model_dir: str | Path, settings: EvalSettings, tasks: tuple[list[str], Any] | None = None
             ) -> dict[str, Any]:
    """Run the harness; returns its result dict (results, configs, versions, n-samples, and samples if asked).
    `tasks`: task_manager(settings.tasks), when the caller evaluates several models."""
    check_model_dir(model_dir, settings.tokenizer)
    names, manager = tasks or task_manager(settings.tasks)
    import lm_eval

    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": settings.dtype}
    if settings.tokenizer:
        model_args["tokenizer"] = settings.tokenizer
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=names, num_fewshot=settings.num_fewshot,
        batch_size=settings.batch_size, device=settings.device, limit=settings.limit, task_manager=manager,
        log_samples=settings.log_samples, random_seed=settings.seed, numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed, fewshot_random_seed=settings.seed)
    if results is None:  # non-zero ranks of a multi-process harness run
        raise EvalError("lm-eval returned no results (run l2e-eval as a single process)")
    return results


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{task: {metric: value}} of the harness's "metric,filter" entries (",none" dropped; N/A stderr -> None)."""
    summary = {}
    for task, metrics in results["results"].items():
        row: dict[str, float | None] = {}
        for key, value in metrics.items():
            if "," not in key:  # alias, name, sample_len: not metrics ("metric,filter" keys are)
                continue
            name = key.removesuffix(",none")
            if isinstance(value, (int, float)):
                row[name] = float(value) if math.isfinite(value) else None
            elif value == "N/A":
                row[name] = None
        summary[task] = row
    return summary
