"""Peak host memory (VmHWM) per rank of building the model, with and without `train.init_from` of an HF dir.

    python benchmarks/init_rss.py make-hf DIR [--config configs/pythia-1b.yaml]     # zero weights, fp16
    torchrun --nproc_per_node 2 benchmarks/init_rss.py measure --tp 2 [--init-from DIR] --out rss.json

`measure` builds the model the way the trainer does (l2e_dist.training.trainer.build_model; the code before it
existed built GPTNeoX on every rank and then called load_init_weights) and nothing else: no data, no engine.
Each rank reports its peak RSS before building (imports, process group) and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _vm_hwm() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def make_hf(directory: str, config: str) -> None:
    """An HF GPTNeoX directory of the config's shape (Pythia's padded vocabulary 50304), fp16 zeros."""
    import torch
    from safetensors.torch import save_file

    from l2e_dist.checkpoint.hf import hf_config_dict, to_hf_state_dict
    from l2e_dist.config import load_config

    cfg = load_config([config], ["model.vocab_size=50304", "model.make_vocab_size_divisible_by=1"]).model
    h, f, n, v = cfg.hidden_size, cfg.ffn_size, cfg.num_layers, 50304
    shapes = {"embed_in.weight": (v, h), "embed_out.weight": (v, h), "final_layer_norm.weight": (h,),
              "final_layer_norm.bias": (h,)}
    for i in range(n):
        p = f"layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                       p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
                       p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
                       p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
                       p + "mlp.dense_h_to_4h.weight": (f, h), p + "mlp.dense_h_to_4h.bias": (f,),
                       p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,)})
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()})
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, v), indent=2))
    print(f"wrote {out} ({sum(t.numel() for t in state.values()) / 1e9:.2f}B params, fp16)")


def measure(tp: int, init_from: str | None, config: str, out: str | None) -> None:
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # a training rank's host-memory settings, before anything allocates a tensor
    import torch
    import torch.distributed as dist

    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import current_layout, destroy_process_groups, init_process_groups

    overrides = ["model.vocab_size=50304", f"parallel.tensor_parallel={tp}"]
    if init_from:
        overrides.append(f"train.init_from={init_from}")
    cfg = load_config([config], overrides)
    init_process_groups(tp)
    layout = current_layout()
    before = _vm_hwm()
    torch.manual_seed(cfg.train.seed)
    try:
        from l2e_dist.training.trainer import build_model
    except ImportError:  # the code before build_model existed
        build_model = None
    if build_model is not None:
        model = build_model(cfg, layout, torch.device("cpu"))
    else:
        from l2e_dist.checkpoint.convert import load_init_weights
        from l2e_dist.model.gpt_neox import GPTNeoX

        model = GPTNeoX(cfg.model)
        if init_from:
            load_init_weights(model, init_from, layout.tp_rank, layout.tp_size)
    after = _vm_hwm()
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    record = torch.tensor([before, after, local], dtype=torch.float64)
    gathered = [torch.zeros_like(record) for _ in range(layout.world_size)]
    dist.all_gather(gathered, record)
    if layout.rank == 0:
        report = {"config": config, "tp": tp, "init_from": init_from, "build_model": build_model is not None,
                  "ranks": [{"rank": r, "peak_rss_before_gib": g[0].item() / 2**30,
                             "peak_rss_after_gib": g[1].item() / 2**30, "shard_param_gib": g[2].item() / 2**30}
                            for r, g in enumerate(gathered)]}
        print(json.dumps(report, indent=2))
        if out:
            Path(out).write_text(json.dumps(report, indent=2) + "\n")
    destroy_process_groups()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-hf")
    make.add_argument("directory")
    make.add_argument("--config", default="configs/pythia-1b.yaml")
    run = sub.add_parser("measure")
    run.add_argument("--tp", type=int, default=2)
    run.add_argument("--init-from")
    run.add_argument("--config", default="configs/pythia-1b.yaml")
    run.add_argument("--out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "make-hf":
        make_hf(args.directory, args.config)
    else:
        measure(args.tp, args.init_from, args.config, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
