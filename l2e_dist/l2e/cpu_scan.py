"""The CPU backend's selecting pass as one fused loop (a small C++ kernel built on first use; cpu_backend.py keeps
the eager form for everything else).

The CPU backend's selecting pass makes, per inhibited layer and micro-batch: d = z - mu, the column
sums of d and d^2, phi = d^2 * inv_denom, the counts of phi >= tau/r and phi >= tau*r, and the flat indices
(with d) of phi >= tau; with top-1 retrieval (MEmeL's default, TP = 1) the indices of each token's largest
phi instead of the threshold's. In eager torch/numpy that is about ten passes over an activation-sized buffer,
the largest part of L2E's CPU cost (figures in docs/benchmarks.md). This kernel does it in one pass over z with
no activation-sized temporary.

It gives the eager path's selection exactly: d, d^2 and phi are the same fp32 operations in the same order
(no FMA contraction), and tau, tau/r and tau*r are compared in fp32 as numpy compares a float32 array with a
Python float. The sums are accumulated in fp64 (eager: fp32 column sums added into the fp64 step buffer), so
they agree to fp32 rounding, not bitwise. tests/test_l2e_numerics.py checks both.

Built with torch.utils.cpp_extension (g++ and ninja, both DeepSpeed requirements) into
~/.cache/torch_extensions/l2e/ (or $TORCH_EXTENSIONS_DIR) under a name hashed from its source, flags and torch
version, so later processes import the built module directly instead of letting load_inline run ninja to check it.
Without a compiler, or with L2E_CPU_KERNEL=0, the eager path runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <cstring>
#include <vector>

// One row: d = z - mu, phi = d^2 * inv (fp32, as eager) and the column sums into fp32 block accumulators.
// Simple loops over restrict pointers so that the compiler vectorises them; cloned for AVX2 and the baseline
// ISA (picked at load time).
__attribute__((target_clones("avx2", "default")))
static void score_row(const float* __restrict__ row, const float* __restrict__ mu, const float* __restrict__ inv,
                      float* __restrict__ d, float* __restrict__ phi, float* __restrict__ acc1,
                      float* __restrict__ acc2, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    const float dj = row[j] - mu[j];
    const float d2 = dj * dj;
    d[j] = dj;
    phi[j] = d2 * inv[j];
    acc1[j] += dj;
    acc2[j] += d2;
  }
}

// Threshold retrieval: one row's counts of phi >= lo and phi >= hi (tau/r, tau*r), and its selection (phi >= mid)
// as bytes (0/1).
__attribute__((target_clones("avx2", "default")))
static void threshold_row(const float* __restrict__ phi, uint8_t* __restrict__ sel, int64_t width, float lo,
                        float mid, float hi, int64_t* n_above_low, int64_t* n_above_high) {
  int32_t low_row = 0, high_row = 0;
  for (int64_t j = 0; j < width; ++j) {
    low_row += phi[j] >= lo ? 1 : 0;
    high_row += phi[j] >= hi ? 1 : 0;
    sel[j] = phi[j] >= mid ? 1 : 0;
  }
  *n_above_low += low_row;
  *n_above_high += high_row;
}

// Top-1 retrieval: a row's selection is every pair at its largest score (ties included); none when a score is
// NaN (eager: amax is NaN, and nothing compares >= NaN). phi = d^2 * inv is +0 or more, or NaN (inv > 0), and
// for such floats the order of their bit patterns is their order, with every NaN above +inf: so the maximum and
// the compares run on the bits as unsigned integers, which vectorise (a float max with NaN checks does not).
__attribute__((target_clones("avx2", "default")))
static void top1_row(const float* __restrict__ phi, uint8_t* __restrict__ sel, int64_t width) {
  uint32_t top = 0;
  for (int64_t j = 0; j < width; ++j) {
    uint32_t bits;
    std::memcpy(&bits, phi + j, 4);
    top = bits > top ? bits : top;
  }
  const uint8_t finite = top > 0x7f800000u ? 0 : 1;  // above +inf's bits: a NaN
  for (int64_t j = 0; j < width; ++j) {
    uint32_t bits;
    std::memcpy(&bits, phi + j, 4);
    sel[j] = (bits >= top ? 1 : 0) & finite;
  }
}

// One pass over z [rows, width] (fp32, contiguous): see l2e_dist/l2e/cpu_scan.py. `topk1`: top-1 retrieval,
// else threshold retrieval at mid with the counts at lo and hi.
static std::vector<torch::Tensor> scan(torch::Tensor z, torch::Tensor mu, torch::Tensor inv_denom, bool topk1,
                                       double lo, double mid, double hi) {
  TORCH_CHECK(z.dim() == 2 && z.scalar_type() == torch::kFloat32 && z.is_contiguous(), "z: 2-d contiguous fp32");
  const int64_t rows = z.size(0), width = z.size(1);
  TORCH_CHECK(width > 0, "z: no neurons");
  TORCH_CHECK(mu.numel() == width && inv_denom.numel() == width, "mu, inv_denom: one value per neuron");
  TORCH_CHECK(mu.scalar_type() == torch::kFloat32 && inv_denom.scalar_type() == torch::kFloat32, "fp32 mu, inv");
  auto mu_c = mu.contiguous();
  auto inv_c = inv_denom.contiguous();
  const float* zp = z.data_ptr<float>();
  const float* mp = mu_c.data_ptr<float>();
  const float* ip = inv_c.data_ptr<float>();
  const float flo = static_cast<float>(lo), fmid = static_cast<float>(mid), fhi = static_cast<float>(hi);
  auto sum1 = torch::zeros({width}, torch::kFloat64);
  auto sum2 = torch::zeros({width}, torch::kFloat64);
  double* s1 = sum1.data_ptr<double>();
  double* s2 = sum2.data_ptr<double>();
  std::vector<float> d(width), phi(width), acc1(width), acc2(width);
  std::vector<uint8_t> sel(width + 8, 0);  // padded: read 8 bytes at a time
  std::vector<int64_t> index;
  std::vector<float> selected_d;
  index.reserve(static_cast<size_t>(topk1 ? rows + 16 : rows * width / 32 + 16));
  selected_d.reserve(index.capacity());
  int64_t n_above_low = 0, n_above_high = 0;
  const int64_t block = 32;  // rows summed in fp32 before adding into the fp64 sums
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    std::fill(acc1.begin(), acc1.end(), 0.0f);
    std::fill(acc2.begin(), acc2.end(), 0.0f);
    const int64_t r1 = std::min(rows, r0 + block);
    for (int64_t r = r0; r < r1; ++r) {
      score_row(zp + r * width, mp, ip, d.data(), phi.data(), acc1.data(), acc2.data(), width);
      if (topk1) {
        top1_row(phi.data(), sel.data(), width);
      } else {
        threshold_row(phi.data(), sel.data(), width, flo, fmid, fhi, &n_above_low, &n_above_high);
      }
      for (int64_t j = 0; j < width; j += 8) {  // few bytes are 1: skip 8 at a time, visit only the hits
        uint64_t word;
        std::memcpy(&word, sel.data() + j, 8);
        while (word) {
          const int64_t k = j + (__builtin_ctzll(word) >> 3);  // the padding bytes stay 0: k < width
          index.push_back(r * width + k);
          selected_d.push_back(d[k]);
          word &= word - 1;
        }
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      s1[j] += static_cast<double>(acc1[j]);
      s2[j] += static_cast<double>(acc2[j]);
    }
  }
  const int64_t n = static_cast<int64_t>(index.size());
  auto index_t = torch::empty({n}, torch::kInt64);
  auto d_t = torch::empty({n}, torch::kFloat32);
  std::copy(index.begin(), index.end(), index_t.data_ptr<int64_t>());
  std::copy(selected_d.begin(), selected_d.end(), d_t.data_ptr<float>());
  auto counts = torch::tensor({n_above_low, n_above_high}, torch::kInt64);
  return {index_t, d_t, sum1, sum2, counts};
}

std::vector<torch::Tensor> threshold_scan(torch::Tensor z, torch::Tensor mu, torch::Tensor inv_denom, double lo,
                                          double mid, double hi) {
  return scan(z, mu, inv_denom, false, lo, mid, hi);
}

std::vector<torch::Tensor> top1_scan(torch::Tensor z, torch::Tensor mu, torch::Tensor inv_denom) {
  return scan(z, mu, inv_denom, true, 0.0, 0.0, 0.0);
}
"""


_CFLAGS = ["-O3", "-ffp-contract=off"]


def _build_name() -> str:
    """The extension's name, unique to its source, flags and torch version: a built module of that name is it."""
    digest = hashlib.sha256("\0".join([_SOURCE, *_CFLAGS, torch.__version__]).encode()).hexdigest()
    return f"l2e_cpu_threshold_scan_{digest[:16]}"


def _load_built(name: str, directory: Path):
    """Import an already built module directly: load_inline would run ninja to check it in every process."""
    built = directory / f"{name}.so"
    if not built.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):  # a damaged build: load_inline builds it again
        return None


@functools.cache
def _kernel():
    """The built extension, or None (opted out, or no compiler: warned once)."""
    if os.environ.get("L2E_CPU_KERNEL", "1") == "0":
        return None
    name = _build_name()
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions" / "l2e"
    directory = Path(root) / name
    module = _load_built(name, directory)
    if module is not None:
        return module
    try:
        from torch.utils.cpp_extension import load_inline

        directory.mkdir(parents=True, exist_ok=True)
        return load_inline(name=name, cpp_sources=_SOURCE, functions=["threshold_scan", "top1_scan"],
                           extra_cflags=_CFLAGS, build_directory=str(directory), verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: run the eager path
        warnings.warn(f"l2e: the fused CPU selecting scan could not be built ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); the eager path runs (slower). "
                      "Install g++ and ninja, or set L2E_CPU_KERNEL=0 to silence this", stacklevel=2)
        return None


def available() -> bool:
    return _kernel() is not None


def usable(flat: Tensor, mu: Tensor) -> bool:
    """Whether the kernel serves this call: CPU fp32 activations and statistics (bf16/fp16 take eager)."""
    return (flat.device.type == "cpu" and flat.dtype == torch.float32 and mu.dtype == torch.float32
            and flat.dim() == 2 and flat.is_contiguous() and available())


def threshold_scan(flat: Tensor, mu: Tensor, inv_denom: Tensor, lo: float, mid: float,
                   hi: float) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int]:
    """(flat indices of phi >= mid, d = z - mu at them, column sums of d and d^2 (fp64), count of phi >= lo,
    count of phi >= hi) for flat [tokens, width]; see the module docstring."""
    index, d, sum1, sum2, counts = _kernel().threshold_scan(flat.detach(), mu, inv_denom, lo, mid, hi)
    n_above_low, n_above_high = counts.tolist()
    return index, d, sum1, sum2, n_above_low, n_above_high


def top1_scan(flat: Tensor, mu: Tensor, inv_denom: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(flat indices of each token's largest score, ties included, d = z - mu at them, column sums of d and
    d^2 (fp64)) for flat [tokens, width]: top-1 retrieval (the MEmeL default) at TP = 1."""
    index, d, sum1, sum2, _ = _kernel().top1_scan(flat.detach(), mu, inv_denom)
    return index, d, sum1, sum2
