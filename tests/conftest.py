"""Shared fixtures: one default-corpus cache per test session, small run configs, multi-process runs."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """Default corpus built once per session (rank-0 build, shared by every run of the session)."""
    cache = os.environ.get("L2E_TEST_DATA_CACHE") or str(tmp_path_factory.mktemp("l2e-data"))
    from l2e_dist.data import prepare_default_corpus

    prepare_default_corpus(cache)
    return cache


def small_run_overrides(output_dir: str | Path, data_cache: str, **extra) -> list[str]:
    """A few-second run: 2-layer model, short sequences, per-step logging, no eval, no progress bar."""
    base = {
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.max_position_embeddings": 32,
        "train.seq_length": 32,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.train_iters": 10,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.save_interval": 0,
        "train.output_dir": str(output_dir),
        "data.cache_dir": data_cache,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "l2e.method": "none",
        "optimizer.grad_clip": 0.1,  # below the gradient norm: clipping is exercised every step
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pretrain_result(overrides: list[str]):
    """Entry point for tests.distributed.run_distributed: train with configs/tiny.yaml + overrides and
    return the TrainResult (losses per logged step, final L2E state, last validation metrics)."""
    import torch.distributed as dist

    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import destroy_process_groups
    from l2e_dist.training.trainer import pretrain

    dist.init_process_group("gloo")
    try:
        return pretrain(load_config([str(ROOT / "configs" / "tiny.yaml")], overrides))
    finally:
        destroy_process_groups()


def pretrain_losses(overrides: list[str]) -> list[float]:
    return pretrain_result(overrides).losses


sys.path.insert(0, str(ROOT))


# Variables an in-process run exports for torch.distributed (launch_env, the bench): a test that leaves them set
# would hand its MASTER_PORT/RANK/WORLD_SIZE to every later test's subprocesses (EADDRINUSE, wrong worlds).
_PROCESS_GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE", "DS_ACCELERATOR", "CUDA_DEVICE_MAX_CONNECTIONS")


@pytest.fixture(autouse=True)
def _restore_process_group_env():
    saved = {name: os.environ.get(name) for name in _PROCESS_GROUP_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Honest CI: under L2E_NO_SKIPS=1 (set by scripts/test.sh, hence .ci/run) a skipped test is a failure.
    The test command installs every tool the suite needs, so a skip means a missing install step."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("L2E_NO_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped ({reason}), but L2E_NO_SKIPS=1 forbids skips: scripts/test.sh must install what it needs"
        )


# ------------------------------------------------------------------------------- reading a trainer run's logs

# metrics.jsonl keys that measure time or memory: they differ between otherwise identical runs.
TIMING_KEYS = {
    "train/tokens_per_s",
    "train/tflops_per_device",
    "train/step_time_s",
    "train/max_rss_gib",
    "train/max_mem_gib",
    "train/mfu",
}


def logged_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> its deterministic training metrics in metrics.jsonl (a later record of a step wins)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records}


def final_loss(text: str) -> str:
    losses = re.findall(r"^final loss (\S+)$", text, flags=re.M)
    assert len(losses) == 1, text
    return losses[0]
