"""Training-step benchmark (`l2e-bench`): our step (method none / l2e / memel) against transformers'
GPTNeoXForCausalLM.

Every variant is built once in ONE process (a world of 1 on gloo, or NCCL on a GPU): our GPT-NeoX under a
DeepSpeed engine (ZeRO stage and precision from the config, the trainer's optimizer and schedule) and the same
weights in Hugging Face's `GPTNeoXForCausalLM` trained by a plain torch AdamW loop (same AdamW settings, same
gradient clipping). The timed steps are interleaved round-robin (one step of each variant per round, the
starting variant rotating), so load drift on a shared machine hits every variant alike; the medians and the
per-round paired ratios are reported.

Choices that matter for reading the figures:
- Device: CPU runs fp32 with 1 intra-op thread unless told otherwise (on a shared, oversubscribed machine OpenMP
  threads wait on each other: slower, far noisier steps; docs/benchmarks.md), sequence length at most 128 and micro
  batch at most 8 unless given. CUDA runs bf16 through the same code: DeepSpeed's bf16 mode for ours, autocast
  bf16 over fp32 weights for transformers; MFU = tokens/s x ModelConfig.flops_per_token / the device's peak
  (training/throughput.py's table, matched to the exact part; none for unknown devices).
- Ratios: median step time of each variant (the headline), the median of the per-round paired ratios with a
  bootstrap 95% interval, and the ratio of 10th percentiles (least disturbed by other load: interference only
  adds time). Load averages before, during and after are in the report.
- Data: `distinct_batches` random token batches drawn once from a seeded generator (vocab of the config) and
  cycled; every variant gets the same batch in a round. Timing does not depend on token values.
- Warm-up: every variant takes the same number of optimizer steps before the timed ones, at least
  `l2e.late_start` + 1, so the timed L2E/MEmeL steps score and select (the steady state) rather than only
  collecting statistics, and no variant is timed at an earlier point of its run than another.
- L2E's statistics all_reduce is issued even in a world of 1 (the reduce group is always passed), so its cost
  and count are in the figures as in a multi-process run. MEmeL here is method memel with retrieval auto
  (per-token top-k); l2e is method l2e with retrieval auto (moving threshold).
- Collectives: torch.distributed's collective functions are wrapped during the timed steps; each call is
  attributed to the first caller outside torch.distributed / deepspeed.comm (l2e_dist.l2e, deepspeed,
  megatron, other). L2E's own count is cross-checked against `L2EInhibitor.collective_count`.
- Memory: on CUDA, torch.cuda.max_memory_allocated over each variant's own timed steps (the peak is reset
  before each step, so interleaving does not mix variants). On CPU a per-variant heap peak cannot be separated
  inside one interleaved process, so two figures are reported: `state_bytes` (parameters, gradients and
  optimizer tensors the variant keeps between steps, shared storages counted once), and, unless disabled,
  `peak_rss_bytes` of a SEPARATE fresh process that builds only that variant and runs a few steps (with
  `baseline_rss_bytes`, the same process's peak before building anything: imports, runtime, process group).

Modules: settings (what to time), variants (how each is built), runner (timing and the report), stats, report,
memory (the CPU peak-RSS probe).
"""

from l2e_dist.bench.report import format_table, write_report
from l2e_dist.bench.runner import run_benchmark
from l2e_dist.bench.settings import VARIANTS, BenchSettings

__all__ = ["VARIANTS", "BenchSettings", "format_table", "run_benchmark", "write_report"]
