"""How much of the L2E regularizer's gradient survives when it is added to the LM gradient in bf16.

    python benchmarks/l2e_bf16_survival.py --config configs/tiny.yaml [--set l2e.reg_lambda=1e-9] [--steps 40]

A 1-rank world on the CPU: the model of the config trains `--steps` fp32 steps with L2E on random tokens (so the
statistics and threshold are those of a run), then, on one more batch, two fp32 gradients are taken at each
inhibited layer: g_up, everything that reaches the layer's activations from above (the LM loss and the later
layers' regularizer terms), and g_own, the layer's own regularizer term. In a bf16 run the regularizer's backward
adds g_own to the bf16 g_up in place (regularizer.CompactSelectedLogSquare / DenseSelectedLogSquare), so the
surviving part is bf16(bf16(g_up) + bf16(g_own)) - bf16(g_up). Reported per layer: the projection of the
surviving part on g_own (1 = all of it survives), the fraction of selected pairs whose bf16 gradient changes at
all, |g_own| / |g_up| on the selected pairs, and the largest |g_own| off them (0 unless the measurement is wrong).

The regularizer node passes z through (its output is a new tensor): g_up is the gradient at that output, and
g_own is the regularizer's gradient at the probe's raw output minus its gradient at the passed-through one.
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
    from l2e_dist.parallel.host_memory import apply_process_settings

    apply_process_settings()  # a training rank's host-memory settings, before anything allocates a tensor
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
        raw: dict[int, torch.Tensor] = {}
        passed: dict[int, torch.Tensor] = {}
        for lid in layers:  # registered before L2E's hook: the probe's own output (the regularizer's input)
            probes[lid].register_forward_hook(lambda m, i, o, lid=lid: raw.__setitem__(lid, o))
        attach(inh, {lid: probes[lid] for lid in layers})
        for lid in layers:  # registered after it: what L2E passed on (the regularizer node's z output)
            probes[lid].register_forward_hook(lambda m, i, o, lid=lid: passed.__setitem__(lid, o))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
        gen = torch.Generator().manual_seed(0)
        shape = (cfg.train.global_batch_size, cfg.train.seq_length + 1)
        for _ in range(args.steps):
            tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
            with inh.micro_batch() as l2e:
                loss = model(tokens[:, :-1], tokens[:, 1:]).mean() + l2e.loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
            inh.end_step()
        tokens = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
        lm = model(tokens[:, :-1], tokens[:, 1:]).mean()
        reg = inh.regularization_loss()
        z_in, z_out = [raw[lid] for lid in layers], [passed[lid] for lid in layers]
        masks = [inh.selected_mask(lid, z.detach()) for lid, z in zip(layers, z_in, strict=True)]
        g_lm = torch.autograd.grad(lm, z_out, retain_graph=True)
        g_reg = (torch.autograd.grad(reg, z_in + z_out, allow_unused=True) if reg.requires_grad
                 else [None] * (2 * len(layers)))
        report = {"reg_lambda": cfg.l2e.reg_lambda, "layers": {}}
        for i, (lid, sel) in enumerate(zip(layers, masks, strict=True)):
            reg_in, reg_out = g_reg[i], g_reg[len(layers) + i]
            if reg_in is None or sel is None or not sel.any():
                report["layers"][lid] = {"selected": 0}
                continue
            later = reg_out if reg_out is not None else 0.0  # the later layers' terms, reaching z from above
            up, own = g_lm[i] + later, reg_in - later
            up_bf16 = up.bfloat16().float()
            survived = (up_bf16 + own.bfloat16().float()).bfloat16().float() - up_bf16
            report["layers"][lid] = {
                "selected": int(sel.sum()),
                "surviving_projection": float((survived * own).sum() / (own * own).sum()),
                "changed_pairs": float((survived[sel] != 0).float().mean()),
                "own_over_upstream_on_selected": float(own[sel].norm() / up[sel].norm()),
                "own_off_selected": float(own[~sel].abs().max()),  # 0: g_own is the layer's own term only
            }
        print(json.dumps(report, indent=2))
    finally:
        destroy_process_groups()
    return 0


if __name__ == "__main__":
    sys.exit(main())
