"""Training of one network of a sweep (one method, one axis point, one repeat); runs inside a worker."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from l2e_dist.emergence.config import EmergenceConfig, Method
from l2e_dist.emergence.network import SkillMLP, skill_strength
from l2e_dist.emergence.skill_model import Axis
from l2e_dist.emergence.tasks import Batch, FixedDataset, SparseParityTasks
from l2e_dist.l2e.hooks import attach
from l2e_dist.l2e.inhibitor import L2EInhibitor, MicroBatch


@dataclass(frozen=True)
class RunSpec:
    axis: Axis
    method: Method
    value: int | None  # D (data axis), N (width axis); None on the time axis
    repeat: int


@dataclass
class RunRecord:
    spec: RunSpec
    steps: list[int]  # steps at which R_k/S was measured
    effective_time: list[float]  # sum of learning rates up to each measured step (the model's t)
    strengths: list[list[float]]  # [n_tasks][len(steps)] R_k/S on held-out samples
    test_loss: list[float]  # P_s-weighted MSE on the held-out samples, at each measured step
    inhibitor_metrics: list[dict[str, float]]  # engine metrics averaged over each interval between measurements
    seconds: float


def run_seeds(base_seed: int, repeat: int) -> tuple[int, int, int]:
    """(init, training data, eval data) seeds of repeat r: shared by every method and axis point."""
    state = np.random.SeedSequence(base_seed, spawn_key=(repeat,)).generate_state(3)
    return int(state[0]), int(state[1]), int(state[2])


def _evaluate(model: SkillMLP, eval_batches: list[Batch], probs: np.ndarray) -> tuple[list[float], float]:
    """R_k/S per skill and the P_s-weighted MSE on the held-out per-skill samples."""
    strengths, loss = [], 0.0
    with torch.no_grad():
        for k, batch in enumerate(eval_batches):
            out = model(batch.x)
            strengths.append(skill_strength(out, batch.y))
            loss += float(probs[k]) * float(((out - batch.y) ** 2).mean())
    return strengths, loss


def train_run(cfg: EmergenceConfig, spec: RunSpec) -> RunRecord:
    """Train one network along `spec.axis` and log R_k/S for every skill."""
    start = time.perf_counter()
    settings = cfg.axis_settings(spec.axis)
    width = spec.value if spec.axis == "width" else settings.width
    init_seed, data_seed, eval_seed = run_seeds(cfg.seed, spec.repeat)
    tasks = SparseParityTasks(cfg.task)
    data_gen = torch.Generator().manual_seed(data_seed)
    eval_gen = torch.Generator().manual_seed(eval_seed)
    eval_batches = [
        tasks.sample_task(k, cfg.eval_samples_per_skill, eval_gen) for k in range(cfg.task.n_tasks)
    ]
    dataset = FixedDataset(tasks, spec.value, data_gen) if spec.axis == "data" else None

    torch.manual_seed(init_seed)
    model = SkillMLP(tasks.input_dim, width, settings.init_std)
    if settings.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr)

    inhibitor = None
    if spec.method != "none":
        engine_cfg = cfg.inhibition.engine_config(spec.method)
        inhibitor = L2EInhibitor(engine_cfg, layer_ids=[0], num_neurons=width)
        attach(inhibitor, {0: model.mlp_probes(engine_cfg.activation)[0]})

    steps, times, curves, losses, metrics = [], [], [], [], []
    elapsed_lr = 0.0
    for step in range(settings.steps + 1):
        if step % settings.eval_every == 0 or step == settings.steps:
            if inhibitor is not None:
                inhibitor.eval()
            strengths, test_loss = _evaluate(model, eval_batches, tasks.probs)
            steps.append(step)
            times.append(elapsed_lr)
            curves.append(strengths)
            losses.append(test_loss)
            if inhibitor is not None:
                metrics.append(inhibitor.metrics())
                inhibitor.train()
        if step == settings.steps:
            break
        lr = settings.lr * 0.5 ** (step // settings.lr_halve_every) if settings.lr_halve_every else settings.lr
        for group in opt.param_groups:
            group["lr"] = lr
        if dataset is not None:
            batch = dataset.next_batch(settings.batch_size, data_gen)
        else:
            batch = tasks.sample(settings.batch_size, data_gen)
        with MicroBatch(inhibitor, None) as l2e:
            loss = torch.nn.functional.mse_loss(model(batch.x), batch.y) + l2e.loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if inhibitor is not None:
            inhibitor.end_step()
        elapsed_lr += lr

    return RunRecord(
        spec=spec,
        steps=steps,
        effective_time=times,
        strengths=np.asarray(curves).T.tolist(),
        test_loss=losses,
        inhibitor_metrics=metrics,
        seconds=time.perf_counter() - start,
    )
