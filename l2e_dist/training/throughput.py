"""Tokens/s and model FLOPs utilisation (MFU) of the training loop.

MFU = achieved model FLOP/s (ModelConfig.flops_per_token x tokens/s) / the devices' peak dense bf16/fp16
tensor-core FLOP/s. The peak depends on the exact part: an H100 PCIe or NVL runs far below an H100 SXM, so
the device name is matched against the most specific pattern first.
"""

from __future__ import annotations

import re
import time

import torch

# (pattern on torch.cuda.get_device_name(), peak dense bf16 TFLOP/s per device, no sparsity), most specific
# first. Sources: NVIDIA data sheets (H100/H200 SXM 989.4, H100 PCIe 756, H100/H200 NVL 835, A100 312, ...).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989.0),
    (r"H200.*NVL", 835.0),
    (r"H200", 989.0),
    (r"H100.*NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H800.*PCIe", 756.0),
    (r"H800", 989.0),
    (r"A100", 312.0),  # SXM4 and PCIe, 40 and 80 GB
    (r"A800", 312.0),
    (r"L40S", 362.0),
    (r"A10G?\b", 125.0),
    (r"\bL4\b", 121.0),
    (r"V100", 125.0),  # fp16 (no bf16 on Volta)
)


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of the named device, None when unknown (then no MFU is reported)."""
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_name, re.IGNORECASE)), None)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingClock:
    """Wall time of the training steps only: evaluation and checkpoint writes run inside `paused()` and do not
    count towards the next interval's step time and tokens/s. The device is synchronised at each pause edge so
    that queued training kernels are charged to training, not to the pause."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start = time.perf_counter()
        self._paused_s = 0.0

    def paused(self) -> _Pause:
        return _Pause(self)

    def lap(self) -> float:
        """Training seconds since the last lap (or the start); restarts the interval."""
        now = time.perf_counter()
        elapsed = now - self._start - self._paused_s
        self._start, self._paused_s = now, 0.0
        return max(elapsed, 1e-9)


class _Pause:
    def __init__(self, clock: TrainingClock):
        self.clock = clock

    def __enter__(self) -> None:
        synchronize(self.clock.device)
        self._t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        synchronize(self.clock.device)
        self.clock._paused_s += time.perf_counter() - self._t0


def tflops_per_device(tokens_per_s: float, flops_per_token: float, devices: int) -> float:
    """Achieved model TFLOP/s per device (ModelConfig.flops_per_token accounting: no recomputation counted)."""
    return tokens_per_s * flops_per_token / devices / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    if peak is None:
        return None
    return tflops_per_device(tokens_per_s, flops_per_token, world_size) / peak
