"""Read the scalars a training run logged: TensorBoard event files (EventAccumulator), else metrics.jsonl.

A run is given as its output directory (events under `<run>/tensorboard/`, as MetricsLogger writes them) or as
the directory that holds the event files. A resumed run re-logs the steps after its last checkpoint (and may
add event files): for every tag the value logged LAST for a step wins, and steps come out sorted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from l2e_dist.errors import UserError

Series = tuple[np.ndarray, np.ndarray]  # (steps int64, values float64)


class RunLogError(UserError, ValueError):
    """A run directory without readable logs (one line, with the fix)."""


def _has_events(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.startswith("events.out.tfevents") for p in directory.iterdir())


def _series(points: dict[int, float]) -> Series:
    steps = np.array(sorted(points), dtype=np.int64)
    return steps, np.array([points[s] for s in steps.tolist()], dtype=np.float64)


def _from_events(directory: Path) -> dict[str, Series]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})  # 0 = keep every point
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags()[SCALARS]:
        points: dict[int, float] = {}
        for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
            points[int(event.step)] = float(event.value)
        out[tag] = _series(points)
    return out


def _from_jsonl(path: Path) -> dict[str, Series]:
    by_tag: dict[str, dict[int, float]] = {}
    with open(path) as stream:
        for line_no, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise RunLogError(f"{path}:{line_no}: not JSON; the log is damaged") from None
            step = int(record.pop("step"))
            for tag, value in record.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    by_tag.setdefault(tag, {})[step] = float(value)
    return {tag: _series(points) for tag, points in by_tag.items()}


def load_scalars(run: str | Path) -> dict[str, Series]:
    """{tag: (steps, values)} of one run (TensorBoard events preferred, metrics.jsonl otherwise)."""
    run = Path(run)
    for directory in (run / "tensorboard", run):
        if _has_events(directory):
            return _from_events(directory)
    if (run / "metrics.jsonl").is_file():
        return _from_jsonl(run / "metrics.jsonl")
    raise RunLogError(f"no TensorBoard event files or metrics.jsonl in {run} (nor {run / 'tensorboard'}): "
                      "give a training output directory")
