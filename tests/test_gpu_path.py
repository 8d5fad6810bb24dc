"""The GPU path's CPU-checkable parts: device selection, fp32 gradient accumulation under bf16, the non-finite
loss stop per precision (with an injected NaN), the MFU peak table and the training-only clock."""

from __future__ import annotations

import json
import os

import pytest
import torch

from l2e_dist.config import load_config
from l2e_dist.config_utils import ConfigError
from l2e_dist.parallel import state
from l2e_dist.training import throughput
from l2e_dist.training.numerics import NonFiniteGuard, TrainingDiverged
from l2e_dist.training.optim import deepspeed_config, effective_zero_stage
from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed

TINY = str(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------------------- device


def test_device_cpu_auto_and_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert state.select_device("cpu").type == "cpu"
    assert state.select_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match=r"'parallel.device'.*is cuda but no CUDA GPU is visible.*parallel.device=cpu"):
        state.select_device("cuda")
    with pytest.raises(ConfigError, match="parallel.device"):
        state.select_device("tpu")


def test_slurm_job_that_asked_for_gpus_and_sees_none_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for name in state._SLURM_GPU_VARIABLES + ("SLURM_TRES_PER_TASK",):
        monkeypatch.delenv(name, raising=False)
    assert state.select_device("auto").type == "cpu"  # a CPU-only Slurm job runs on CPU
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(ConfigError, match=r"asked for GPUs \(SLURM_GPUS_ON_NODE=4\) but none is visible"):
        state.select_device("auto")
    assert state.select_device("cpu").type == "cpu"  # on purpose
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("SLURM_TRES_PER_TASK", "cpu=8,gres/gpu:1")
    assert state.slurm_requested_gpus() == "SLURM_TRES_PER_TASK=cpu=8,gres/gpu:1"


def test_cuda_device_max_connections_is_set_for_tensor_parallel(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "recorded")  # so that monkeypatch restores the original
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    state._set_cuda_environment(1)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    state._set_cuda_environment(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")  # a user's own value is kept
    state._set_cuda_environment(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


@pytest.mark.slow
def test_pretrain_with_device_cuda_and_no_gpu_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "launcher.pretrain", "--config", TINY, "--set", "parallel.device=cuda",
         "--set", f"train.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("l2e-pretrain:")]
    assert len(errors) == 1 and "parallel.device" in errors[0] and "no CUDA GPU" in errors[0], proc.stderr[-2000:]


# ------------------------------------------------------------------------------- fp32 gradient accumulation


@pytest.mark.parametrize(("stage", "runs"), [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_bf16_accumulates_gradients_in_fp32(stage, runs):
    cfg = load_config([TINY], ["deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}"])
    assert effective_zero_stage(cfg, 1) == runs  # stage 0 has no fp32 accumulation in DeepSpeed: runs as 1
    ds = deepspeed_config(cfg, 1)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["zero_optimization"]["stage"] == runs
    for precision in ("fp32", "fp16"):
        other = load_config([TINY], [f"deepspeed.precision={precision}"])
        assert "data_types" not in deepspeed_config(other, 1)


def _bf16_engine_accumulation(stage: int) -> dict:
    """A bf16 engine on CPU over 4 micro-batches: the dtype its gradients accumulate in, and whether the
    accumulated gradient equals the fp32 sum of the micro-batch gradients."""
    import deepspeed
    import torch.distributed as dist

    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups
    from l2e_dist.training.optim import initialize_engine

    init_process_groups(1)
    try:
        cfg = load_config([TINY], ["deepspeed.precision=bf16", f"deepspeed.zero_stage={stage}",
                                   "train.micro_batch_size=1", "train.global_batch_size=4"])
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
        engine = initialize_engine(model, cfg, 1)
        optimizer = engine.optimizer
        if isinstance(optimizer, deepspeed.runtime.bf16_optimizer.BF16_Optimizer):
            dtype = optimizer.grad_acc_dtype
            buffers = {t.dtype for group in optimizer.fp32_groups_gradients for t in group}
        else:
            dtype = optimizer.gradient_accumulation_dtype
            buffers = {dtype}
        return {"optimizer": type(optimizer).__name__, "dtype": str(dtype), "buffers": sorted(map(str, buffers)),
                "world": dist.get_world_size()}
    finally:
        destroy_process_groups()


@pytest.mark.slow
def test_bf16_engine_on_cpu_holds_fp32_gradient_accumulators():
    for stage, optimizer in ((1, "BF16_Optimizer"), (2, "DeepSpeedZeroOptimizer")):
        (result,) = run_distributed(_bf16_engine_accumulation, 1, stage)
        assert result["optimizer"] == optimizer, result
        assert result["dtype"] == "torch.float32" and result["buffers"] == ["torch.float32"], result


# ------------------------------------------------------------------------------------ non-finite losses


def test_guard_fp32_stops_at_the_first_non_finite_loss():
    guard = NonFiniteGuard("fp32", patience=3)
    guard.after_step(1, 2.0, True, None)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2 in fp32"):
        guard.after_step(2, float("nan"), True, None)


def test_guard_bf16_tolerates_isolated_bad_steps_and_stops_after_patience():
    guard = NonFiniteGuard("bf16", patience=3)
    for step, loss in enumerate([2.0, float("nan"), float("inf"), 1.9, float("nan"), float("nan")], 1):
        guard.after_step(step, loss, step_applied=loss == loss and abs(loss) != float("inf"), loss_scale=None)
    assert guard.skipped_steps == 4 and guard.streak == 2
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* bf16, up to step 7 .*nonfinite_patience=3"):
        guard.after_step(7, float("nan"), False, None)


def test_unsupported_precision_is_a_config_error_naming_the_key(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    from l2e_dist.training.optim import check_precision_supported

    accelerator = type(get_accelerator())
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda self: False)
    monkeypatch.setattr(accelerator, "is_bf16_supported", lambda self: True)
    with pytest.raises(ConfigError, match=r"'deepspeed.precision': fp16 is not supported.*set deepspeed.precision=bf16"):
        check_precision_supported("fp16")
    monkeypatch.setattr(accelerator, "is_bf16_supported", lambda self: False)
    with pytest.raises(ConfigError, match=r"'deepspeed.precision': bf16 is not supported.*set deepspeed.precision=fp32"):
        check_precision_supported("bf16")
    check_precision_supported("fp32")


def test_guard_fp16_counts_overflows_only_at_the_minimum_loss_scale():
    guard = NonFiniteGuard("fp16", patience=2, min_loss_scale=1.0)
    for step, scale in enumerate([4096.0, 2048.0, 1024.0, 2.0], 1):  # the scaler backs off: normal in fp16
        guard.after_step(step, float("inf"), step_applied=False, loss_scale=scale)
    assert guard.streak == 0
    guard.after_step(5, 3.0, step_applied=False, loss_scale=1.0)  # finite loss, overflowing gradients
    with pytest.raises(TrainingDiverged, match="minimum fp16 loss scale 1 in fp16, up to step 6"):
        guard.after_step(6, float("inf"), step_applied=False, loss_scale=1.0)


def _pretrain_with_nan(overrides: list[str], nan_steps: list[int], assume_fp16: bool = False):
    """pretrain() whose LM loss is NaN on the micro-batches of the given (1-based) optimizer steps.

    `assume_fp16`: report fp16 as supported even where this CPU has no oneDNN fp16 kernels (AVX512-FP16). torch
    still computes fp16 there, only slower, and what is tested is DeepSpeed's loss scaling with our guard."""
    from deepspeed.accelerator import get_accelerator

    from l2e_dist.model import gpt_neox
    from tests.conftest import pretrain_result

    if assume_fp16:
        type(get_accelerator()).is_fp16_supported = lambda self: True  # this spawned worker process only

    calls = {"n": 0}
    gas = 2  # small_run_overrides: global 8 / micro 2 / ... set by the test below
    forward = gpt_neox.GPTNeoX.forward

    def forward_with_nan(self, tokens, labels=None, reduction="none"):
        out = forward(self, tokens, labels, reduction)
        if labels is None or not self.training:
            return out
        calls["n"] += 1
        step = (calls["n"] - 1) // gas + 1
        return out * float("nan") if step in nan_steps else out

    gpt_neox.GPTNeoX.forward = forward_with_nan
    try:
        result = pretrain_result(overrides)
        return {"losses": result.losses, "final_step": result.final_step, "error": None}
    except TrainingDiverged as exc:
        return {"losses": None, "final_step": None, "error": str(exc)}


@pytest.mark.slow
def test_injected_nan_in_bf16_is_skipped_once_and_stops_the_run_when_it_persists(tmp_path, data_cache):
    base = dict(**{"train.global_batch_size": 4, "train.micro_batch_size": 2, "train.train_iters": 6,
                   "deepspeed.precision": "bf16", "train.nonfinite_patience": 2, "optimizer.lr": 1e-3})
    (once,) = run_distributed(_pretrain_with_nan, 1, small_run_overrides(tmp_path / "once", data_cache, **base), [3])
    assert once["error"] is None and once["final_step"] == 6
    assert once["losses"][2] != once["losses"][2]  # step 3's logged loss is the NaN
    assert all(loss == loss for i, loss in enumerate(once["losses"]) if i != 2)  # the update was skipped
    records = [json.loads(line) for line in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/skipped_steps", 0) for r in records] == [0, 0, 1, 1, 1, 1]

    (persists,) = run_distributed(
        _pretrain_with_nan, 1, small_run_overrides(tmp_path / "persists", data_cache, **base), [3, 4, 5, 6])
    assert persists["error"] is not None and "2 consecutive steps" in persists["error"], persists
    assert "up to step 4" in persists["error"] and "bf16" in persists["error"]


# ------------------------------------------------------------------------------------ MFU and tokens/s


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_tflops_matches_the_exact_part(name, peak):
    assert throughput.peak_tflops(name) == peak


def test_training_clock_leaves_out_eval_and_checkpoint_time(monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: now["t"])
    clock = throughput.TrainingClock(torch.device("cpu"))
    now["t"] += 2.0  # two training steps
    with clock.paused():  # evaluation
        now["t"] += 30.0
    now["t"] += 1.0
    with clock.paused():  # checkpoint write
        now["t"] += 10.0
    assert clock.lap() == pytest.approx(3.0)
    now["t"] += 4.0
    assert clock.lap() == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------- compile


def _losses(overrides: list[str]) -> list[float]:
    from tests.conftest import pretrain_losses

    return pretrain_losses(overrides)


@pytest.mark.slow
def test_compiled_layers_train_like_eager(tmp_path, data_cache):
    """train.compile=true (torch.compile per layer, L2E hooks eager between its halves) gives the eager losses on CPU."""
    extra = {"train.train_iters": 4, "l2e.method": "l2e", "l2e.late_start": 2}
    eager = run_distributed(_losses, 1, small_run_overrides(tmp_path / "eager", data_cache, **extra))[0]
    compiled = run_distributed(
        _losses, 1, small_run_overrides(tmp_path / "compiled", data_cache, **extra, **{"train.compile": "true"}))[0]
    assert len(eager) == 4 and all(loss == loss for loss in eager)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_injected_nan_in_fp16_stops_once_the_loss_scale_is_at_its_minimum(tmp_path, data_cache):
    """fp16 on CPU, loss scale 2**2: the NaN steps first halve the scale (normal fp16 overflows, skipped), and
    only `nonfinite_patience` overflowing steps at the minimum scale stop the run."""
    extra = {"train.global_batch_size": 4, "train.micro_batch_size": 2, "train.train_iters": 12,
             "deepspeed.precision": "fp16", "deepspeed.initial_scale_power": 2, "train.nonfinite_patience": 2}
    (r,) = run_distributed(
        _pretrain_with_nan, 1, small_run_overrides(tmp_path, data_cache, **extra), list(range(3, 13)), True)
    assert r["error"] is not None and "minimum fp16 loss scale 1" in r["error"], r
    step = int(r["error"].split("up to step ")[1].split(" ")[0])
    assert 5 <= step <= 10, r  # not at the first overflow: scale 4 -> 2 -> 1 (hysteresis 2) first


# ------------------------------------------------------------------------------ host synchronizations


def _synchronize_calls_per_step(micro_batches: int, steps: int) -> list[int]:
    """Train the tiny model `steps` optimizer steps of `micro_batches` micro-batches through the trainer's own
    functions and count DeepSpeed accelerator synchronize() calls in each step."""
    from deepspeed.accelerator import get_accelerator

    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups
    from l2e_dist.training.optim import initialize_engine
    from l2e_dist.training.trainer import end_l2e_step, train_micro_batch

    init_process_groups(1)
    accelerator = get_accelerator()
    calls = [0]
    original = accelerator.synchronize

    def counting_synchronize(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    try:
        cfg = load_config([TINY], ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2",
                                   "model.vocab_size=64", "train.seq_length=8", "train.micro_batch_size=1",
                                   f"train.global_batch_size={micro_batches}", "l2e.method=none"])
        torch.manual_seed(0)
        engine = initialize_engine(GPTNeoX(cfg.model), cfg, 1)
        accelerator.synchronize = counting_synchronize
        per_step = []
        for _ in range(steps):
            calls[0] = 0
            for _ in range(micro_batches):
                train_micro_batch(engine, None, torch.randint(0, 64, (1, 9)))
            end_l2e_step(engine, None)
            per_step.append(calls[0])
        return per_step
    finally:
        accelerator.synchronize = original
        destroy_process_groups()


@pytest.mark.slow
def test_deepspeed_adds_no_device_synchronize_to_a_training_step():
    # DeepSpeed's default throughput timer would synchronize twice per micro-batch (8 per step here).
    (per_step,) = run_distributed(_synchronize_calls_per_step, 1, 4, 3)
    assert per_step == [0, 0, 0], per_step
