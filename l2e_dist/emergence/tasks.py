"""Multitask sparse parity (Michaud et al. 2023; Nam et al. 2024): the data source of the emergence testbed.

An input is the one-hot code of a task k (n_tasks bits) followed by n_bits random bits. Task k's label is
the parity of its own k_sparse bits, so a network that has learned task k ("skill k") must have found
those bits. Tasks are drawn with the power law P_s(k) ~ k^-(alpha+1); frequent skills get more gradient
signal and emerge first. Targets are y = S * (2 * parity - 1) for the mean-squared-error loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from l2e_dist.config_utils import ConfigError


def power_law_probs(n_tasks: int, alpha: float) -> np.ndarray:
    """P_s(k) = k^-(alpha+1) / sum_j j^-(alpha+1), k = 1..n_tasks (Nam et al.'s alpha; exponent alpha+1)."""
    weights = np.arange(1, n_tasks + 1, dtype=np.float64) ** -(alpha + 1.0)
    return weights / weights.sum()


@dataclass
class TaskConfig:
    """The task family. Nam et al.: 5 tasks, 32 bits, 3-bit parities on disjoint bits, alpha 0.6, S 5.

    The default is that family with 16 bits (the CI-sized testbed; configs/emergence/paper_*.yaml set 32).
    """

    n_tasks: int = 5
    n_bits: int = 16
    k_sparse: int = 3
    alpha: float = 0.6
    scale: float = 5.0
    bit_sets: Literal["disjoint", "overlapping"] = "disjoint"
    seed: int = 0  # chooses the bit sets; the same for every run of a sweep

    def validate(self) -> None:
        for key in ("n_tasks", "n_bits", "k_sparse"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.k_sparse > self.n_bits:
            raise ConfigError("k_sparse", f"must be <= n_bits ({self.n_bits}), got {self.k_sparse}")
        if self.bit_sets == "disjoint" and self.n_tasks * self.k_sparse > self.n_bits:
            raise ConfigError(
                "bit_sets",
                f"disjoint sets need n_tasks*k_sparse <= n_bits ({self.n_tasks}*{self.k_sparse} > "
                f"{self.n_bits}); raise n_bits or use bit_sets: overlapping",
            )
        if self.alpha <= -1.0:
            raise ConfigError("alpha", f"must be > -1 so that frequencies decrease, got {self.alpha}")
        if self.scale <= 0:
            raise ConfigError("scale", f"must be > 0, got {self.scale}")


@dataclass
class Batch:
    x: torch.Tensor  # [n, n_tasks + n_bits] float32 (one-hot task code, then the bits)
    y: torch.Tensor  # [n] float32 targets +-S
    task: torch.Tensor  # [n] int64, 0-based task index


class SparseParityTasks:
    """Samples batches of the task family; every random draw goes through the caller's torch.Generator."""

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        if cfg.bit_sets == "disjoint":
            chosen = rng.permutation(cfg.n_bits)[: cfg.n_tasks * cfg.k_sparse]
            sets = chosen.reshape(cfg.n_tasks, cfg.k_sparse)
        else:
            sets = np.stack([rng.choice(cfg.n_bits, cfg.k_sparse, replace=False) for _ in range(cfg.n_tasks)])
        self.bit_sets = torch.as_tensor(np.sort(sets, axis=1), dtype=torch.int64)
        self.probs = power_law_probs(cfg.n_tasks, cfg.alpha)
        self._probs_t = torch.as_tensor(self.probs, dtype=torch.float64)

    @property
    def input_dim(self) -> int:
        return self.cfg.n_tasks + self.cfg.n_bits

    def _make(self, task: torch.Tensor, generator: torch.Generator) -> Batch:
        n = task.shape[0]
        bits = torch.randint(0, 2, (n, self.cfg.n_bits), generator=generator, dtype=torch.int64)
        parity = bits.gather(1, self.bit_sets[task]).sum(dim=1) % 2
        code = torch.nn.functional.one_hot(task, self.cfg.n_tasks)
        x = torch.cat([code, bits], dim=1).to(torch.float32)
        y = (self.cfg.scale * (2 * parity - 1)).to(torch.float32)
        return Batch(x=x, y=y, task=task)

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """n fresh samples with tasks drawn from the power law."""
        task = torch.multinomial(self._probs_t, n, replacement=True, generator=generator)
        return self._make(task, generator)

    def sample_task(self, task_index: int, n: int, generator: torch.Generator) -> Batch:
        """n samples of one task (0-based), for measuring that skill's strength."""
        return self._make(torch.full((n,), task_index, dtype=torch.int64), generator)


class FixedDataset:
    """A fixed training set of D samples (data axis), served in shuffled epochs of minibatches."""

    def __init__(self, tasks: SparseParityTasks, size: int, generator: torch.Generator):
        self.data = tasks.sample(size, generator)
        self.size = size
        self._order = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    def next_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """The next minibatch (the whole set when batch_size >= D); reshuffles at each epoch start."""
        if batch_size >= self.size:
            return self.data
        if self._pos + batch_size > self._order.numel():
            self._order = torch.randperm(self.size, generator=generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + batch_size]
        self._pos += batch_size
        return Batch(x=self.data.x[idx], y=self.data.y[idx], task=self.data.task[idx])
