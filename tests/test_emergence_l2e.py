"""L2E/MEmeL on the testbed through the pretraining engine: on/off emergence-time tables from the same seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from l2e_dist.emergence.config import load_config
from l2e_dist.emergence.sweep import format_emergence_table, run_sweep

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "emergence" / "time_small.yaml")


@pytest.mark.slow
def test_l2e_on_off_gives_emergence_tables_from_the_same_seeds(tmp_path: Path) -> None:
    cfg = load_config(CONFIG, [
        f"output_dir={tmp_path}", "workers=2", "repeats=1", "task.n_tasks=3", "time_axis.steps=3000",
        "inhibition.methods=[none,l2e]",
    ])
    summary = run_sweep(cfg, log=False)
    time_axis = summary["axes"]["time"]
    table = time_axis["emergence_table"]
    assert [row["skill"] for row in table] == [1, 2, 3]
    for row in table:
        assert len(row["none"]) == len(row["l2e"]) == 1
    none, l2e = (time_axis["methods"][m] for m in ("none", "l2e"))
    # Same seeds: identical initial network and held-out set, so the step-0 measurements agree exactly.
    assert np.asarray(none["network"]["runs"])[..., 0].tolist() == np.asarray(l2e["network"]["runs"])[..., 0].tolist()
    assert none["test_loss"]["runs"][0][0] == l2e["test_loss"]["runs"][0][0]
    # The engine is hooked into the hidden layer: training differs, and it selected ~p of the activations.
    assert not np.allclose(none["network"]["runs"], l2e["network"]["runs"])
    late = [m["l2e/layer0/selected_frac"] for m in l2e["inhibitor_metrics"][0][-10:]]
    ratio = cfg.inhibition.engine_config("l2e").inhibit_ratio
    assert np.mean(late) == pytest.approx(ratio, rel=0.5)
    assert none["inhibitor_metrics"] == [[]]
    text = format_emergence_table(summary)
    assert "none" in text and "l2e" in text and len(text.splitlines()) == 5
