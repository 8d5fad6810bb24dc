"""GPU-only losses caught on CPU: host synchronisation inside a bf16 training step (run on the meta device, where
the dense GPU path of L2E runs and any read of a value is an error), the MFU formula against torch's own FLOP
counter, the job scripts asking for GPUs, the CUDA/NCCL environment exported before CUDA starts, and the shorter
collective timeout after the first step."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed

aten = torch.ops.aten
# Ops that make the host wait for the device: a value read (.item(), bool(), equality) or an output whose shape
# depends on the data (the host must learn the size before it can allocate).
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
                 aten.allclose.default, aten.nonzero.default, aten.masked_select.default,
                 aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
                 aten.repeat_interleave.Tensor}


DEVICE_TO_HOST = "device-to-host read"


def _is_device_to_host(func, args, kwargs) -> bool:
    source = args[0] if args else None
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    if func is aten._to_copy.default:
        return torch.device(kwargs.get("device") or source.device).type == "cpu"
    return func is aten._local_scalar_dense.default


class HostSyncDetector(TorchDispatchMode):
    """Records every op that would synchronise the host with the device, and every op that creates a CPU tensor
    (a host-side value the step would have to copy or read), while the step runs on the meta device. A read of a
    device value (.item(), .tolist(), .cpu()) is recorded as DEVICE_TO_HOST and answered with zeros, so the step
    goes on and every later event is seen too."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_device_to_host(func, args, kwargs):
            self.events.append(DEVICE_TO_HOST)
            zeros = torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            return zeros.item() if func is aten._local_scalar_dense.default else zeros
        if func in HOST_SYNC_OPS:
            self.events.append(f"{func}: host sync")
        elif func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                              for i in args[1] if i is not None):
            self.events.append(f"{func} with a boolean mask: data-dependent shape (host sync)")
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.events.append(f"{func}: created a CPU tensor {tuple(tensor.shape)} {tensor.dtype}")
        return out


def _meta_bf16_step_events(method: str, steps: int, plant_item: bool, fkr: bool = False) -> list[list[str]]:
    """bf16 training steps (forward, LM loss + L2E regularizer, backward, L2E's end of step) on the meta device
    with L2E selecting from the second step; per step, the host syncs and CPU tensors the detector saw."""
    from l2e_dist.config import RunConfig
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import current_layout, destroy_process_groups, init_process_groups
    from l2e_dist.training.trainer import build_inhibitor

    init_process_groups(1, device="cpu")
    try:
        cfg = RunConfig()
        cfg.model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256,
                                max_position_embeddings=64)
        cfg.l2e.method, cfg.l2e.forget_steps, cfg.l2e.late_start = method, 1, 1
        cfg.l2e.fkr, cfg.l2e.num_features = fkr, 4 if fkr else 0
        meta = torch.device("meta")
        with meta:
            model = GPTNeoX(cfg.model).to(torch.bfloat16)
        inhibitor = build_inhibitor(cfg, model, current_layout(), 2, meta, always_reduce=False)
        tokens = torch.zeros(steps, 2, 2, 33, dtype=torch.long, device=meta)
        per_step = []
        for step in range(steps):
            step_loss = torch.zeros((), dtype=torch.float64, device=meta)
            with HostSyncDetector() as detector:
                for micro in tokens[step]:
                    if inhibitor is not None:
                        inhibitor.set_features(torch.zeros_like(micro[:, :-1]) if fkr else None)
                    lm_loss = model(micro[:, :-1], micro[:, 1:], reduction="mean")
                    loss = lm_loss + inhibitor.regularization_loss() if inhibitor is not None else lm_loss
                    loss.backward()
                    if inhibitor is not None:
                        inhibitor.finish_micro_batch()
                    step_loss += lm_loss.detach().double() / 2
                if inhibitor is not None:
                    inhibitor.end_step(applied=True, step=step + 1)
                if plant_item:
                    step_loss.item()  # the kind of read the detector must report
            per_step.append(detector.events)
        return per_step
    finally:
        destroy_process_groups()


def test_host_sync_detector_reports_a_planted_read():
    (per_step,) = run_distributed(_meta_bf16_step_events, 1, "none", 1, True)
    assert per_step == [[DEVICE_TO_HOST]], per_step


@pytest.mark.parametrize(("method", "fkr"), [
    pytest.param("none", False, marks=pytest.mark.slow), pytest.param("l2e", False, marks=pytest.mark.slow),
    pytest.param("memel", False, marks=pytest.mark.slow), ("l2e", True)])  # the fast tier: L2E with FKR
def test_bf16_step_on_the_meta_device_never_syncs_with_the_host(method, fkr):
    """Forward, backward and L2E's step boundary must stay on the device: no data-dependent shape, no CPU tensor,
    and no value read but L2E's one per optimizer step (its merged scalars, l2e/merge.py). The trainer's read of
    the step loss (after its all_reduce) is outside the detector."""
    (per_step,) = run_distributed(_meta_bf16_step_events, 1, method, 3, False, fkr)
    expected = [] if method == "none" else [DEVICE_TO_HOST]
    assert per_step == [expected] * 3, per_step


def _counted_and_formula_flops() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1, device="cpu")
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=500,
                          max_position_embeddings=64)
        model = GPTNeoX(cfg)
        batch, seq = 2, 48
        tokens = torch.randint(0, 500, (batch, seq + 1))
        # The math attention backend: its bmm's are counted (the CPU flash kernel has no FLOP formula in torch),
        # causal or not, as the formula (PaLM/Megatron accounting) counts them.
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(tokens[:, :-1], tokens[:, 1:], reduction="mean").backward()
        return {"counted": counter.get_total_flops(), "tokens": batch * seq,
                "formula_per_token": cfg.flops_per_token(seq, model.padded_vocab_size)}
    finally:
        destroy_process_groups()


def test_mfu_formula_counts_what_flop_counter_mode_counts():
    from l2e_dist.training.throughput import mfu, tflops_per_device

    (r,) = run_distributed(_counted_and_formula_flops, 1)
    assert r["formula_per_token"] * r["tokens"] == r["counted"], r
    tokens_per_s = 1e6
    assert tflops_per_device(tokens_per_s, r["formula_per_token"], 2) == pytest.approx(
        r["counted"] / r["tokens"] * tokens_per_s / 2 / 1e12)
    assert mfu(tokens_per_s, r["formula_per_token"], 989.0, 1) == pytest.approx(
        r["counted"] / r["tokens"] * tokens_per_s / 1e12 / 989.0)


@pytest.mark.parametrize("script", ["pretrain.sbatch", "pretrain_deepspeed.sbatch"])
def test_job_scripts_ask_for_gpus_and_export_the_gpu_environment_first(script):
    text = (ROOT / "slurm" / script).read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.MULTILINE)
    gpus = [d for d in directives if d.startswith("--gpus-per-node=") or d.startswith("--gres=gpu")]
    tasks = [d for d in directives if d.startswith("--ntasks-per-node=")]
    assert gpus and tasks and gpus[0].rsplit("=", 1)[1].rsplit(":", 1)[-1] == tasks[0].split("=")[1], directives
    export_at = text.index("-m launcher.gpu_env")
    assert export_at < text.index("\nsrun "), "the CUDA/NCCL environment must be exported before any rank starts"


def test_pythia_configs_say_cuda():
    from l2e_dist.config import load_config

    sizes = sorted((ROOT / "configs").glob("pythia-*.yaml"))
    assert len(sizes) >= 18
    for path in sizes:
        assert load_config([str(path)]).parallel.device == "cuda", path.name


def test_gpu_environment_for_a_job(monkeypatch, tmp_path):
    from launcher.gpu_env import job_environment

    tiny = str(ROOT / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    tp1 = job_environment(["--config", tiny, "--set", f"train.output_dir={out}"], {})
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in tp1  # no TP communication to order: DP overlap keeps its queues
    assert tp1["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and tp1["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert int(tp1["TORCH_FR_BUFFER_SIZE"]) > 0 and tp1["TORCH_FR_BUFFER_SIZE"] == tp1["TORCH_NCCL_TRACE_BUFFER_SIZE"]
    assert tp1["TORCH_FR_DUMP_TEMP_FILE"] == str(out / "nccl_trace" / "rank_")
    tp2 = job_environment(["--config", tiny, "--set=parallel.tensor_parallel=2", "--other", "x"], {})
    assert tp2["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    kept = job_environment(["--config", tiny, "--set", "parallel.tensor_parallel=2"],
                           {"CUDA_DEVICE_MAX_CONNECTIONS": "8", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"})
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in kept and "TORCH_NCCL_DUMP_ON_TIMEOUT" not in kept
    broken = job_environment(["--config", str(tmp_path / "missing.yaml")], {})
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in broken and "CUDA_DEVICE_MAX_CONNECTIONS" not in broken


def _collective_timeouts(overrides: list[str]) -> list:
    """pretrain() recording the timeouts it gives the process groups and when each step's micro-batches ran."""
    import l2e_dist.training.trainer as trainer
    from tests.conftest import pretrain_result

    events = []
    original_init, original_set, original_micro = (trainer.init_process_groups, trainer.set_collective_timeout,
                                                   trainer.train_micro_batch)

    def init(tp, timeout_s, device):
        events.append(("init", timeout_s))
        return original_init(tp, timeout_s, device)

    def set_timeout(seconds):
        events.append(("set", seconds))
        return original_set(seconds)

    def micro(*args, **kwargs):
        if not events or events[-1][0] != "micro":
            events.append(("micro",))
        return original_micro(*args, **kwargs)

    trainer.init_process_groups, trainer.set_collective_timeout = init, set_timeout
    trainer.train_micro_batch = micro
    pretrain_result(overrides)
    return events


@pytest.mark.slow
def test_collective_timeout_is_shortened_after_the_first_step(tmp_path, data_cache):
    """The start-up timeout holds until the first step is done, also across a resume (a slow phase before the
    loop), then dist_timeout_s."""
    extra = {"parallel.startup_timeout_s": 2000.0, "parallel.dist_timeout_s": 1000.0,
             "optimizer.lr_decay_iters": 4}  # one schedule: the 2-step run is extended (run identity)
    for iters in (2, 4):  # a fresh run, then its resume from step 2
        overrides = small_run_overrides(tmp_path, data_cache, **extra, **{"train.train_iters": iters})
        (events,) = run_distributed(_collective_timeouts, 1, overrides)
        assert events[0] == ("init", 2000.0), events
        first_micro = events.index(("micro",))
        assert [e for e in events[:first_micro] if e[0] == "set"][-1:] in ([], [("set", 2000.0)]), events
        second_micro = events.index(("micro",), first_micro + 1)
        assert ("set", 1000.0) in events[first_micro:second_micro], events
    assert any(e[0] == "set" for e in events[:first_micro]), events  # the resume did run as a slow phase


def test_startup_timeout_is_never_below_the_collective_timeout():
    from l2e_dist.config import load_config
    from l2e_dist.config_utils import ConfigError

    tiny = str(ROOT / "configs" / "tiny.yaml")
    dist_timeout = load_config([tiny]).parallel.dist_timeout_s
    assert load_config([tiny], ["parallel.startup_timeout_s=100"]).parallel.startup_collective_timeout_s() == (
        dist_timeout)
    assert load_config([tiny]).parallel.startup_collective_timeout_s() == 3600
    with pytest.raises(ConfigError, match="startup_timeout_s"):
        load_config([tiny], ["parallel.startup_timeout_s=0"])


def test_process_without_the_job_environment_gets_the_nccl_part_and_a_late_cuda_warning(monkeypatch, tmp_path):
    """init_process_groups on CUDA: the NCCL variables (read when the process group is created) are defaulted
    and the flight recorder's folder made; CUDA_DEVICE_MAX_CONNECTIONS is set while CUDA is not initialised,
    and once it is, only a warning says to export it in the job script (setting it then would do nothing)."""
    import os

    from l2e_dist.parallel import gpu_env, state

    names = ["CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
             *gpu_env.nccl_environment()]
    for name in names:
        monkeypatch.setenv(name, "recorded")  # so that monkeypatch restores the original
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="CUDA_DEVICE_MAX_CONNECTIONS would come too late.*launcher.gpu_env"):
        state._set_cuda_environment(2)
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    assert all(os.environ[k] == v for k, v in gpu_env.nccl_environment().items())
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", str(tmp_path / "trace" / "rank_"))
    state._set_cuda_environment(2)
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and (tmp_path / "trace").is_dir()
