"""l2e-plot: runs logged by the trainer's own MetricsLogger (TensorBoard + metrics.jsonl, one run resumed) are
read back exactly and drawn as one labelled PNG comparing L2E on/off."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from l2e_dist.analysis.plots import ema, plot_runs
from l2e_dist.analysis.runlogs import load_scalars
from l2e_dist.training.metrics import MetricsLogger

LAYERS = (2, 3)


def _metrics(step: int, l2e: bool, shift: float) -> dict[str, float]:
    out = {"train/loss": 5.0 / (1 + 0.1 * step) + shift, "train/lr": 1e-3 * min(1.0, step / 5)}
    if l2e:
        for lid in LAYERS:
            prefix = f"l2e/layer{lid}/"
            out.update({prefix + "threshold": 8.0 + np.sin(step) + lid, prefix + "selected_frac": 0.02 + 0.001 * lid,
                        prefix + "reg": -1e-6 * step, prefix + "mean_score": 0.9 + 0.01 * lid,
                        prefix + "fkr": 0.5 - 0.01 * step})
    return out


def _log_run(directory, steps: range, l2e: bool, shift: float = 0.0, start: int = 0) -> dict[str, dict[int, float]]:
    """Log like the trainer; returns {tag: {step: value}} of what was written."""
    logger = MetricsLogger(str(directory), enabled=True, total_steps=steps.stop, start_step=start,
                           progress_bar=False)
    written: dict[str, dict[int, float]] = {}
    for step in steps:
        metrics = _metrics(step, l2e, shift)
        logger.log(step, metrics, console=False)
        if l2e and step % 5 == 0:
            valid = {"valid/loss": 4.0 / (1 + 0.1 * step), f"valid/l2e/layer{LAYERS[0]}/frac_above_ref": 0.01}
            logger.log(step, valid, console=False)
            metrics |= valid
        for tag, value in metrics.items():
            written.setdefault(tag, {})[step] = value
    logger.close()
    return written


@pytest.mark.slow
def test_runs_read_back_and_plotted(tmp_path, capsys):
    from matplotlib.image import imread

    from launcher.plot import main

    l2e_run, base_run = tmp_path / "l2e", tmp_path / "base"
    written = _log_run(l2e_run, range(1, 11), l2e=True)
    resumed = _log_run(l2e_run, range(6, 16), l2e=True, shift=0.25, start=5)  # restart from step 5: new values win
    for tag, points in resumed.items():
        written[tag].update(points)
    base_written = _log_run(base_run, range(1, 16), l2e=False)

    for run, expected in ((l2e_run, written), (base_run, base_written)):
        scalars = load_scalars(run)
        assert set(scalars) == set(expected)
        for tag, points in expected.items():
            steps, values = scalars[tag]
            assert steps.tolist() == sorted(points)
            np.testing.assert_allclose(values, [points[s] for s in sorted(points)], rtol=1e-6)  # float32 events
    jsonl_only = tmp_path / "jsonl-only"
    jsonl_only.mkdir()
    shutil.copy(l2e_run / "metrics.jsonl", jsonl_only / "metrics.jsonl")
    from_jsonl, from_events = load_scalars(jsonl_only), load_scalars(l2e_run)
    assert set(from_jsonl) == set(from_events)
    for tag in from_events:
        np.testing.assert_array_equal(from_jsonl[tag][0], from_events[tag][0])
        np.testing.assert_allclose(from_jsonl[tag][1], from_events[tag][1], rtol=1e-6)

    out = tmp_path / "figs" / "compare.png"
    assert main([str(base_run), str(l2e_run), "--labels", "L2E off", "L2E on", "--out", str(out),
                 "--smooth", "0.5", "--title", "test"]) == 0
    assert "L2E on: " in capsys.readouterr().out
    image = imread(out)
    # 1 loss/lr row + 6 L2E metric rows of 3.2 in (320 px at 100 dpi); 2 layer columns of 4.2 in
    assert image.shape[:2] == (320 * 7, 420 * 2)
    assert image[..., :3].std() > 0.05 and len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 50

    figure = plot_runs({"off": load_scalars(base_run), "on": from_events})
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 2 + 5 * len(LAYERS) + 1  # frac_above_ref only exists for layer 2
    for ax in visible:
        assert ax.get_xlabel() == "step" and ax.get_ylabel() and ax.get_title() and ax.lines
    loss_lines = {line.get_label() for line in visible[0].lines}
    assert loss_lines == {"off train", "on train", "on valid"}


def test_ema_matches_tensorboard_formula():
    values = np.array([1.0, 3.0, 2.0, 5.0])
    expected, acc = [], 0.0
    for i, v in enumerate(values):
        acc = 0.6 * acc + 0.4 * v
        expected.append(acc / (1 - 0.6 ** (i + 1)))
    np.testing.assert_allclose(ema(values, 0.6), expected)
    np.testing.assert_array_equal(ema(values, 0.0), values)


def test_plot_errors_are_one_line(tmp_path, capsys):
    from launcher.plot import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no TensorBoard event files or metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    assert main([str(tmp_path), "--smooth", "1.5"]) == 2
    assert "--smooth" in capsys.readouterr().err

