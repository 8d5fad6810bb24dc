"""Peak host memory (VmHWM) per rank of branching from a native GPT-NeoX checkpoint at the pythia-1b shape.

    python benchmarks/neox_import_rss.py [--layers 4] [--dp 4] [--tp 2] [--dir /tmp/neox-1b]

1. writes a synthetic gpt-neox `global_step1000/` of pythia-1b's width (hidden 2048, 8 heads, padded vocabulary
   50304; `--layers` of its 16 transformer layers: the disk and this host's memory bound the full 16), source
   TP 1, ZeRO-1 over `--dp` ranks with a reduce bucket scaled from 1b's 5e8 by the parameter count, so the
   weight-decay group has as many communication intervals as 1b's (C > 1, rank-interleaved);
2. starts `--tp` ranks (gloo, CPU, fp32) that do what the trainer does: build the model from the layer files
   (build_model -> load_neox_weights), build the DeepSpeed engine, then continue_neox_optimizer
   (masters + moments into this rank's TP slice);
3. prints per rank: the resident memory of the engine with its optimizer state (the floor any run has), and the
   peak during each import phase (VmHWM reset through /proc/self/clear_refs before each phase).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
GIB = 2**30
PYTHIA_1B = {"hidden": 2048, "heads": 8, "layers": 16, "vocab": 50304, "bucket": 5e8}


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS


def write_checkpoint(out: Path, layers: int, dp: int, bucket: int, iteration: int = 1000) -> dict:
    """A gpt-neox directory in the native format (tests/neox_writer.py's layout), generated kind by kind and rank
    by rank so that the writer holds about one flat group plus one rank's pieces."""
    import torch

    from tests.neox_writer import FakeDynamicLossScaler, pipeline_names, weight_decay_group, zero1_partition

    hidden, heads, vocab = PYTHIA_1B["hidden"], PYTHIA_1B["heads"], PYTHIA_1B["vocab"]
    out.mkdir(parents=True, exist_ok=True)
    names = pipeline_names(layers)
    shape = {"word_embeddings.weight": (vocab, hidden), "final_linear.weight": (vocab, hidden),
             "attention.query_key_value.weight": (3 * hidden, hidden), "attention.query_key_value.bias": (3 * hidden,),
             "attention.dense.weight": (hidden, hidden), "mlp.dense_h_to_4h.weight": (4 * hidden, hidden),
             "mlp.dense_h_to_4h.bias": (4 * hidden,), "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden)}
    shapes = OrderedDict((n, torch.Size(shape.get(n.split(".", 1)[1], (hidden,)))) for n, _ in names)
    for layer in sorted({int(n.split(".")[0]) for n in shapes}):
        state = {n.split(".", 1)[1]: torch.full(s, 0.01, dtype=torch.float16) for n, s in shapes.items()
                 if int(n.split(".")[0]) == layer}
        torch.save(state, out / f"layer_{layer:02d}-model_00-model_states.pt")
    args = {"num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "max_position_embeddings": 2048,
            "make_vocab_size_divisible_by": 128, "padded_vocab_size": vocab, "tokenizer_type": "HFTokenizer",
            "model_parallel_size": 1}
    torch.save({"module": None, "optimizer": None, "skipped_steps": 0, "global_steps": iteration,
                "global_samples": iteration * 1024, "dp_world_size": dp, "mp_world_size": 1, "iteration": iteration,
                "args": args, "csr_tensor_module_names": set(),
                "lr_scheduler": {"start_lr": 3e-4, "warmup_iter": 1430, "num_iters": iteration, "decay_style": "cosine",
                                 "end_iter": 143000, "min_lr": 3e-5}}, out / "mp_rank_00_model_states.pt")
    groups = [[n for n in shapes if weight_decay_group(n) == g] for g in (0, 1)]
    intervals = []
    scaler = FakeDynamicLossScaler(cur_scale=4096.0, cur_iter=iteration, last_overflow_iter=-1, scale_window=1000,
                                   min_scale=1, delayed_shift=2, cur_hysteresis=2, consecutive_hysteresis=False)
    import types
    from unittest import mock

    fake = {m: types.ModuleType(m) for m in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16",
                                               "deepspeed.runtime.fp16.loss_scaler")}
    fake["deepspeed.runtime.fp16.loss_scaler"].DynamicLossScaler = FakeDynamicLossScaler
    for rank in range(dp):
        kinds = {}
        for kind, value in (("fp32", 0.01), ("exp_avg", 1e-4), ("exp_avg_sq", 1e-8)):
            per_group = []
            for members in groups:
                flat = torch.full((sum(shapes[n].numel() for n in members),), value)
                pieces, count, _ = zero1_partition(flat, dp, bucket)
                per_group.append(pieces[rank])
                if rank == 0 and kind == "fp32":
                    intervals.append(count)
                del flat, pieces
            kinds[kind] = per_group
        state = {"loss_scaler": scaler, "dynamic_loss_scale": True, "overflow": False, "zero_stage": 1,
                 "partition_count": dp, "num_comm_intervals_per_group": intervals,
                 "local_sub_partitions_of_fp32_groups": kinds["fp32"],
                 "base_optimizer_state": [[{"exp_avg": a, "exp_avg_sq": b} for a, b in zip(ea, es)]
                                          for ea, es in zip(kinds["exp_avg"], kinds["exp_avg_sq"])]}
        with mock.patch.dict(sys.modules, fake):
            torch.save({"optimizer_state_dict": state, "param_shapes": shapes},
                       out / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del kinds, state
    return {"params": sum(s.numel() for s in shapes.values()), "intervals": intervals}


def _measure(directory: str, layers: int, tp: int, iteration: int) -> dict:
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # a training rank's host-memory settings, before anything allocates a tensor
    import torch

    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups
    from l2e_dist.training.neox_branch import continue_neox_optimizer, neox_branch
    from l2e_dist.training.optim import initialize_engine
    from l2e_dist.training.trainer import build_model

    layout = init_process_groups(tp)
    try:
        cfg = load_config([str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")], [
            f"model.num_layers={layers}", "model.hidden_size=2048", "model.num_attention_heads=8",
            "model.max_position_embeddings=2048", "model.vocab_size=50277", f"parallel.tensor_parallel={tp}",
            f"train.init_from={directory}", f"train.branch_step={iteration}", f"train.train_iters={iteration + 10}",
            "train.micro_batch_size=1", "train.global_batch_size=1", "deepspeed.zero_stage=1", "l2e.method=none"])
        figures = {"rank": layout.rank, "start_rss_gib": _status("VmRSS") / GIB}
        branch = neox_branch(cfg)
        _reset_peak()
        started = time.perf_counter()
        model = build_model(cfg, layout, torch.device("cpu"))
        figures["weights_s"] = time.perf_counter() - started
        figures["weights_peak_gib"] = _status("VmHWM") / GIB
        engine = initialize_engine(model, cfg, 1)
        figures["engine_rss_gib"] = _status("VmRSS") / GIB
        _reset_peak()
        started = time.perf_counter()
        continue_neox_optimizer(engine, cfg, branch)
        figures["optimizer_s"] = time.perf_counter() - started
        figures["optimizer_peak_gib"] = _status("VmHWM") / GIB
        figures["after_rss_gib"] = _status("VmRSS") / GIB
        figures["after_rss_anon_gib"] = _status("RssAnon") / GIB
        figures["after_rss_file_gib"] = _status("RssFile") / GIB
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the allocator kept of freed temporaries
        figures["after_trim_rss_gib"] = _status("VmRSS") / GIB
        local = sum(p.numel() for p in model.parameters())
        figures["local_params_m"] = local / 1e6
        figures["state_gib"] = local * 12 / GIB  # fp32 weights + two moments: what the run must hold anyway
        return figures
    finally:
        destroy_process_groups()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer layers of pythia-1b's 16 (disk/memory)")
    parser.add_argument("--dp", type=int, default=4, help="DP ranks of the synthetic source (ZeRO-1 files)")
    parser.add_argument("--tp", type=int, default=2, help="TP ranks of the importing run (processes)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(args.dir or tempfile.mkdtemp(prefix="neox-1b-"))
    ckpt = root / "global_step1000"
    try:
        full_params = PYTHIA_1B["layers"] * 12 * PYTHIA_1B["hidden"] ** 2 + 2 * PYTHIA_1B["vocab"] * PYTHIA_1B["hidden"]
        own = args.layers * 12 * PYTHIA_1B["hidden"] ** 2 + 2 * PYTHIA_1B["vocab"] * PYTHIA_1B["hidden"]
        bucket = int(PYTHIA_1B["bucket"] * own / full_params)
        started = time.perf_counter()
        if (ckpt / "mp_rank_00_model_states.pt").is_file():  # --dir of an earlier run: measure again
            print(f"reusing {ckpt}", flush=True)
        else:
            written = write_checkpoint(ckpt, args.layers, args.dp, bucket)
            size = sum(p.stat().st_size for p in ckpt.iterdir())
            print(f"wrote {ckpt}: {written['params'] / 1e6:.0f}M params, {size / GIB:.2f} GiB, dp={args.dp}, "
                  f"bucket={bucket}, intervals per group {written['intervals']} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
        from tests.distributed import run_distributed

        for figures in run_distributed(_measure, args.tp, str(ckpt), args.layers, args.tp, 1000):
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}), flush=True)
        peak_extra = max(0.0, figures["optimizer_peak_gib"] - figures["after_rss_gib"])
        print(f"last rank: optimizer import peak {figures['optimizer_peak_gib']:.2f} GiB = resident after "
              f"{figures['after_rss_gib']:.2f} GiB + {peak_extra:.2f} GiB transient (the largest tensor full-width, "
              f"its mapped source pages and this rank's slice: {PYTHIA_1B['vocab'] * PYTHIA_1B['hidden'] * 4 / GIB:.2f}"
              " GiB each for the fp32 embedding)")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
