"""Start-up checks of the compute settings: model.attention_backend (each CPU backend gives today's outputs and
gradients; one without a kernel is a one-line config error at start-up) and the warning for an L2E lambda that
half precision would round away (its estimate against the survival benchmark's measurement)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed
from tests.test_fused_cross_entropy import _assert_same, _model_gradients

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_cpu_attention_backends_equal_the_default_path():
    (auto, math, flash, flash_fused), = run_distributed(
        _model_gradients, 1,
        [{}, {"attention_backend": "math"}, {"attention_backend": "flash"},
         {"attention_backend": "flash", "cross_entropy": "fused"}])
    for other in (math, flash, flash_fused):
        _assert_same(auto, other, 1e-5)


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_gpu_only_backend_on_cpu_is_a_config_error(backend):
    from l2e_dist.config_utils import ConfigError
    from l2e_dist.model.attention_backend import check_attention_backend

    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ConfigError, match="model.attention_backend") as info:
            check_attention_backend(backend, torch.device("cpu"), dtype, 4, 16)
        assert "set model.attention_backend=auto" in str(info.value)
        assert "\n" not in str(info.value)
    for usable in ("auto", "math", "flash"):
        check_attention_backend(usable, torch.device("cpu"), torch.float32, 4, 16)


@pytest.mark.slow
def test_pretrain_refuses_a_gpu_only_backend_at_start_up(data_cache, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launcher.pretrain", "--config", TINY]
    for item in small_run_overrides(out, data_cache, **{"model.attention_backend": "efficient"}):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_",
                                                                      "LOCAL_RANK", "L2E_DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("l2e-pretrain: error:")]
    assert len(errors) == 1 and "'model.attention_backend'" in errors[0] and "auto" in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert not out.exists() or not any(out.rglob("global_step*"))


def _config(*overrides: str, paths=(TINY,)):
    from l2e_dist.config import load_config

    return load_config(list(paths), ["model.vocab_size=512", *overrides])


def test_l2e_rounding_warning_names_the_key_and_the_fix():
    from l2e_dist.training.compute_checks import l2e_rounding_warning

    faint = _config("deepspeed.precision=bf16", "l2e.reg_lambda=1e-12")
    line = l2e_rounding_warning(faint)
    assert line is not None and "\n" not in line
    assert "l2e.reg_lambda=1e-12 in bf16 would mostly round away" in line and "raise l2e.reg_lambda" in line
    assert "set l2e.grad_precision=fp32" in line
    needed = float(line.split("raise l2e.reg_lambda to >= ")[1].split(",")[0])
    assert l2e_rounding_warning(_config("deepspeed.precision=bf16", f"l2e.reg_lambda={needed * 1.01}")) is None
    for quiet in (("deepspeed.precision=fp32", "l2e.reg_lambda=1e-12"),
                  ("deepspeed.precision=bf16", "l2e.reg_lambda=1e-12", "l2e.method=memel"),
                  ("deepspeed.precision=bf16", "l2e.reg_lambda=1e-12", "l2e.method=none"),
                  ("deepspeed.precision=bf16", "l2e.reg_lambda=0"),
                  ("deepspeed.precision=bf16", "l2e.reg_lambda=1e-12", "l2e.grad_precision=fp32")):
        assert l2e_rounding_warning(_config(*quiet)) is None, quiet
    # fp16 resolves 8x finer than bf16: a lambda just above fp16's threshold warns in bf16 only.
    between = needed / 4
    assert l2e_rounding_warning(_config("deepspeed.precision=fp16", f"l2e.reg_lambda={between}")) is None
    assert l2e_rounding_warning(_config("deepspeed.precision=bf16", f"l2e.reg_lambda={between}")) is not None


def test_estimate_follows_the_loss_definitions():
    """"sum": the regularizer's gradient per pair is lambda x its derivative while the mean LM loss's falls as
    1/tokens per step, so the ratio grows with the tokens per step; "mean" divides both by them."""
    from l2e_dist.training.compute_checks import estimated_l2e_gradient_ratio as ratio

    base = ratio(_config("l2e.reg_lambda=1e-10"))
    assert ratio(_config("l2e.reg_lambda=1e-10", "train.global_batch_size=64")) == pytest.approx(4 * base)
    assert ratio(_config("l2e.reg_lambda=1e-10", "train.micro_batch_size=4")) == pytest.approx(base)
    assert ratio(_config("l2e.reg_lambda=2e-10")) == pytest.approx(2 * base)
    mean = ratio(_config("l2e.reg_lambda=1e-10", "l2e.reduction=mean"))
    assert ratio(_config("l2e.reg_lambda=1e-10", "l2e.reduction=mean", "train.global_batch_size=64")) == \
        pytest.approx(mean)
    assert mean == pytest.approx(base / (16 * 128))  # tiny: 16 x 128 tokens per step


def test_start_up_logs_one_warning_line(capsys):
    from l2e_dist.training.compute_checks import check_compute_settings

    check_compute_settings(_config("deepspeed.precision=bf16", "l2e.reg_lambda=1e-13"), torch.device("cpu"), 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "round away" in line]
    assert len(lines) == 1 and "l2e.reg_lambda" in lines[0]
    check_compute_settings(_config("deepspeed.precision=bf16", "l2e.reg_lambda=1e-6"), torch.device("cpu"), 1)
    assert "round away" not in capsys.readouterr().out


def test_the_cpu_l2e_backend_on_an_accelerator_is_a_config_error():
    from l2e_dist.config_utils import ConfigError
    from l2e_dist.training.compute_checks import check_compute_settings

    cuda = torch.device("cuda")  # nothing is allocated on it: the attention backend is auto
    with pytest.raises(ConfigError, match=r"'l2e.backend'.*'cpu' runs on CPU activations.*on cuda.*auto, dense or compiled"):
        check_compute_settings(_config("l2e.method=l2e", "l2e.backend=cpu"), cuda, 1)
    for ok in ("auto", "dense", "compiled"):
        check_compute_settings(_config("l2e.method=l2e", f"l2e.backend={ok}"), cuda, 1)
    check_compute_settings(_config("l2e.method=l2e", "l2e.backend=cpu"), torch.device("cpu"), 1)
    check_compute_settings(_config("l2e.method=none", "l2e.backend=cpu"), cuda, 1)  # no engine, nothing to refuse


def _surviving_projections(reg_lambda: float) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "l2e_bf16_survival.py"), "--config", TINY, "--steps", "14",
         "--set", f"l2e.reg_lambda={reg_lambda}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    layers = json.loads(done.stdout[done.stdout.index("{"):])["layers"]
    return [row["surviving_projection"] for row in layers.values()]


@pytest.mark.slow
def test_warning_threshold_against_the_measured_survival():
    """A tenth of the lambda the warning asks for loses most of the term on every layer; ten times it keeps
    most of it (benchmarks/l2e_bf16_survival.py on configs/tiny.yaml, measured here)."""
    from l2e_dist.training.compute_checks import l2e_rounding_warning

    line = l2e_rounding_warning(_config("deepspeed.precision=bf16", "l2e.reg_lambda=1e-14"))
    needed = float(line.split("raise l2e.reg_lambda to >= ")[1].split(",")[0])
    assert max(_surviving_projections(needed / 10)) < 0.5
    assert min(_surviving_projections(needed * 10)) > 0.5


def test_pythia_levels_are_estimated_to_survive_bf16():
    """Pythia's lambdas (1e-9 .. 1e-11) over its 1024 x 2048 tokens per step: far above the threshold."""
    from l2e_dist.training.compute_checks import l2e_rounding_warning

    for size in ("160m", "2.8b"):
        cfg = _config("deepspeed.precision=bf16", "l2e.method=l2e",
                      paths=(str(ROOT / "configs" / f"pythia-{size}.yaml"),))
        assert l2e_rounding_warning(cfg) is None, size
