"""How much of the L2E regularizer's gradient survives when it is added to the LM gradient in bf16.

    python benchmarks/l2e_bf16_survival.py --config configs/tiny.yaml [--set l2e.reg_lambda=1e-9] [--steps 40]

A 1-rank world on the CPU: the model of the config trains `--steps` fp32 steps with L2E on random tokens (so the
statistics and threshold are those of a run), then, on one more batch, the gradient at each inhibited layer's
activations is taken separately for the LM loss (g_lm) and for the regularizer (g_reg), in fp32. In bf16 the two
are summed into one bf16 tensor; the surviving part is bf16(g_lm + g_reg) - bf16(g_lm). Reported per layer: the
projection of the surviving part on g_reg (1 = all of it survives), the fraction of selected pairs whose bf16
gradient changes at all, and |g_reg| / |g_lm| on the selected pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from l2e_dist.parallel.launch_env import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch.distributed as dist

    from l2e_dist.config import load_config
    from l2e_dist.data.default_corpus import VOCAB_SIZE
    from l2e_dist.l2e import L2EInhibitor, attach
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    cfg = load_config(args.config or ["configs/tiny.yaml"], [f"model.vocab_size={VOCAB_SIZE}", *args.set])
    dist.init_process_group("gloo")
    init_process_groups(1)
    try:
        torch.manual_seed(cfg.train.seed)
        model = GPTNeoX(cfg.model)
        layers = cfg.l2e.resolve_layers(cfg.model.num_layers)
        inh = L2EInhibitor(cfg.l2e, layers, cfg.model.ffn_size)
        probes = model.mlp_probes(cfg.l2e.activation)
        attach(inh, {lid: probes[lid] for lid in layers})
        captured: dict[int, torch.Tensor] = {}
        for lid in layers:  # registered after L2E's hook: sees the probe's (possibly inhibited) output
            probes[lid].register_forward_hook(lambda m, i, o, lid=lid: captured.__setitem__(lid, o))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
        gen = torch.Generator().manual_seed(0)
        shape = (cfg.train.global_batch_size, cfg.train.seq_length + 1)
        for _ in range(args.steps):
            tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
            loss = model(tokens[:, :-1], tokens[:, 1:]).mean() + inh.regularization_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            inh.finish_micro_batch()
            inh.end_step()
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
        lm = model(tokens[:, :-1], tokens[:, 1:]).mean()
        reg = inh.regularization_loss()
        zs = [captured[lid] for lid in layers]
        masks = [inh.selected_mask(lid, z.detach()) for lid, z in zip(layers, zs, strict=True)]
        g_lm = torch.autograd.grad(lm, zs, retain_graph=True)
        g_reg = torch.autograd.grad(reg, zs, allow_unused=True)
        report = {"reg_lambda": cfg.l2e.reg_lambda, "layers": {}}
        for lid, a, b, sel in zip(layers, g_lm, g_reg, masks, strict=True):
            if b is None or sel is None or not sel.any():
                report["layers"][lid] = {"selected": 0}
                continue
            survived = (a + b).bfloat16().float() - a.bfloat16().float()
            report["layers"][lid] = {
                "selected": int(sel.sum()),
                "surviving_projection": float((survived * b).sum() / (b * b).sum()),
                "changed_pairs": float((survived[sel] != 0).float().mean()),
                "reg_over_lm_on_selected": float(b[sel].norm() / a[sel].norm()),
            }
        print(json.dumps(report, indent=2))
    finally:
        destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
