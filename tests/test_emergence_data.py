"""Multitask sparse parity data: labels, task frequencies, bit sets, fixed datasets, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from l2e_dist.config_utils import ConfigError, build
from l2e_dist.emergence.config import EmergenceConfig, load_config
from l2e_dist.emergence.tasks import FixedDataset, SparseParityTasks, TaskConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "emergence"


def _reference_labels(x: np.ndarray, bit_sets: np.ndarray, n_tasks: int, scale: float) -> np.ndarray:
    """Label recomputed from the input alone: task from the one-hot code, parity of that task's bits."""
    assert np.all(x[:, :n_tasks].sum(axis=1) == 1)
    task = x[:, :n_tasks].argmax(axis=1)
    bits = x[:, n_tasks:]
    parity = np.array([int(bits[i, bit_sets[t]].sum()) % 2 for i, t in enumerate(task)])
    return scale * (2 * parity - 1)


@pytest.mark.parametrize("bit_sets", ["disjoint", "overlapping"])
def test_labels_are_parities_of_the_task_bits(bit_sets: str) -> None:
    cfg = TaskConfig(n_tasks=6, n_bits=20, k_sparse=3, alpha=0.6, scale=5.0, bit_sets=bit_sets, seed=3)
    tasks = SparseParityTasks(cfg)
    sets = tasks.bit_sets.numpy()
    assert sets.shape == (6, 3)
    assert all(len(set(row)) == 3 and row.min() >= 0 and row.max() < 20 for row in sets)
    if bit_sets == "disjoint":
        assert len(set(sets.ravel())) == 18
    batch = tasks.sample(3000, torch.Generator().manual_seed(0))
    x = batch.x.numpy()
    assert set(np.unique(x)) <= {0.0, 1.0}
    np.testing.assert_array_equal(batch.y.numpy(), _reference_labels(x, sets, 6, 5.0))
    np.testing.assert_array_equal(batch.task.numpy(), x[:, :6].argmax(axis=1))
    # Both parities occur for every task (the labels are not constant).
    for t in range(6):
        assert set(np.unique(batch.y.numpy()[batch.task.numpy() == t])) == {-5.0, 5.0}
    single = tasks.sample_task(4, 500, torch.Generator().manual_seed(1))
    assert torch.all(single.task == 4)
    np.testing.assert_array_equal(single.y.numpy(), _reference_labels(single.x.numpy(), sets, 6, 5.0))


def test_task_frequencies_follow_the_power_law() -> None:
    n_tasks, alpha, n = 8, 0.6, 40_000
    tasks = SparseParityTasks(TaskConfig(n_tasks=n_tasks, n_bits=24, alpha=alpha))
    counts = np.bincount(tasks.sample(n, torch.Generator().manual_seed(5)).task.numpy(), minlength=n_tasks)
    k = np.arange(1, n_tasks + 1, dtype=np.float64)
    expected = k ** -(alpha + 1)
    expected /= expected.sum()
    assert stats.chisquare(counts, n * expected).pvalue > 1e-3
    # The exponent is alpha + 1, not alpha (the pitfall noted for Nam et al.'s code): that is rejected.
    wrong = k**-alpha / (k**-alpha).sum()
    assert stats.chisquare(counts, n * wrong).pvalue < 1e-6


def test_fixed_dataset_serves_each_sample_once_per_epoch() -> None:
    tasks = SparseParityTasks(TaskConfig(n_bits=16))
    gen = torch.Generator().manual_seed(0)
    data = FixedDataset(tasks, 90, gen)
    for _ in range(2):
        seen = torch.cat([data.next_batch(30, gen).x for _ in range(3)])
        # One epoch serves exactly the fixed set (as a multiset: a random set may repeat a row).
        assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, data.data.x.tolist()))
    assert data.next_batch(500, gen) is data.data  # batch >= D: full-batch steps


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["time_axis.widht=64"], "time_axis.widht"),
        (["time_axis.lr=fast"], "time_axis.lr"),
        (["task.n_bits=10"], "task.bit_sets"),
        (["axes=[time,depth]"], "axes[1]"),
        (["inhibition.methods=[l2e,bogus]"], "inhibition.methods[1]"),
        (["inhibition.l2e.reg_lambda=much"], "inhibition.l2e.reg_lambda"),
        (["inhibition.l2e.inhibit_ratio=0.9"], "inhibition.l2e.inhibit_ratio"),
        (["inhibition.l2e.method=memel"], "inhibition.l2e.method"),
        (["width_axis.widths=[]"], "width_axis.widths"),
        (["skill_model.init_strength=0.7"], "skill_model.init_strength"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(CONFIGS / "time_small.yaml"), overrides)
    assert info.value.key == key


def test_shipped_configs_build_and_engine_defaults_are_the_testbed_ones() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(str(path))
        assert isinstance(cfg, EmergenceConfig)
    engine = build(EmergenceConfig, {"inhibition": {"methods": ["none", "l2e"]}}).inhibition.engine_config("l2e")
    assert (engine.method, engine.layers, engine.reduction) == ("l2e", [0], "mean")
