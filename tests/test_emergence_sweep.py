"""End-to-end sweeps on CPU: skills emerge in frequency order and the one-parameter model follows the
network; the CLI and the data/width axes run (L2E on/off: test_emergence_l2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from l2e_dist.emergence.config import load_config
from l2e_dist.emergence.sweep import run_sweep
from launcher.emergence import main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "emergence" / "time_small.yaml")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Stated accuracy of the fitted skill-basis model on the CI sweep: RMSE of R_k/S per skill over the run
# (measured 0.02-0.08 for seeds 0 and 1).
MODEL_RMSE_BOUND = 0.12


@pytest.mark.slow
def test_time_sweep_skills_emerge_in_frequency_order_and_model_predicts_them(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "workers=2"])
    summary = run_sweep(cfg, log=False)
    result = summary["axes"]["time"]["methods"]["none"]
    emergence = result["emergence"]["mean_curve"]
    assert all(e is not None for e in emergence), emergence
    assert np.all(np.diff(emergence) > 0), emergence  # skill 1 (most frequent) first, skill 5 last
    mean = np.asarray(result["network"]["mean"])
    assert mean.shape == (5, len(summary["axes"]["time"]["x"]))
    assert np.all(np.abs(mean[:, 0]) < 0.05) and np.all(mean[:, -1] > 0.5)
    rmse = result["prediction_error"]["rmse"]
    assert max(rmse) < MODEL_RMSE_BOUND, rmse
    assert 1.0 < result["theta"] < 1000.0
    on_disk = json.loads((tmp_path / "emergence.json").read_text())
    assert on_disk["axes"]["time"]["methods"]["none"]["theta"] == pytest.approx(result["theta"])
    assert (tmp_path / "emergence_time.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_writes_json_and_figures_and_rejects_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    rc = main(["--config", CONFIG, "--set", f"output_dir={out}", "--set", "workers=1", "--set", "repeats=1",
               "--set", "time_axis.steps=60", "--set", "time_axis.eval_every=20"])
    assert rc == 0
    assert json.loads((out / "emergence.json").read_text())["axes"]["time"]["x"] == [0, 20, 40, 60]
    assert (out / "emergence_time.png").read_bytes()[:8] == PNG_MAGIC
    assert "theta=" in capsys.readouterr().out
    rc = main(["--config", CONFIG, "--set", "time_axis.stepz=10"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "time_axis.stepz" in err and "steps" in err


def test_without_figures_the_json_still_lands_in_a_new_directory(tmp_path: Path) -> None:
    out = tmp_path / "new" / "nested"
    rc = main(["--config", CONFIG, "--set", f"output_dir={out}", "--set", "workers=1", "--set", "repeats=1",
               "--set", "figures=false", "--set", "time_axis.steps=20", "--set", "time_axis.eval_every=20"])
    assert rc == 0 and json.loads((out / "emergence.json").read_text())["figures"] == []


def test_data_and_width_axes_run_and_fit(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, [
        f"output_dir={tmp_path}", "workers=1", "repeats=2", "axes=[data,width]", "inhibition.methods=[none,l2e,memel]",
        "data_axis.sizes=[40,400]", "data_axis.steps=30", "data_axis.width=32",
        "width_axis.widths=[2,16]", "width_axis.steps=30", "width_axis.batch_size=200",
    ])
    summary = run_sweep(cfg, log=False)
    assert summary["runs"] == 2 * 2 * 3 * 2  # axes x points x methods x repeats
    for axis, values in (("data", [40, 400]), ("width", [2, 16])):
        data = summary["axes"][axis]
        assert data["x"] == values
        for method in ("none", "l2e", "memel"):
            result = data["methods"][method]
            assert np.asarray(result["network"]["runs"]).shape == (2, 5, 2)
            assert np.isfinite(result["theta"]) and result["theta"] > 0
            assert len(result["prediction_error"]["rmse"]) == 5
        assert (tmp_path / f"emergence_{axis}.png").read_bytes()[:8] == PNG_MAGIC
