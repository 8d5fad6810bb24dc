"""Multi-process (gloo) engine tests: DP=2, TP=2 and TP=2 x DP=2, each with 2 micro-batches per optimizer step,
equal ONE process taking each step's whole global batch as a single micro-batch.

Model per rank: z = gelu(x @ W) (layer 1) and tanh(x @ W) (layer 3) with W column-split over TP ranks; each
step's global batch of tokens is split into MICRO x DP chunks (micro-batch m of DP rank r takes chunk m*DP + r);
grads are averaged over micro-batches and DP like DeepSpeed. The reference is the same engine in one process
(no process group, micro_batches_per_step=1) on the whole global batch of each step.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from l2e_dist.l2e import L2EConfig, L2EInhibitor
from l2e_dist.parallel.collectives import CollectiveCounter
from l2e_dist.parallel.launch_env import free_port

F64 = torch.float64
HIDDEN, WIDTH, GLOBAL_TOKENS, MICRO, STEPS, NF = 6, 8, 48, 2, 8, 3
LAYERS = (1, 3)
LAYOUTS = [(2, 1), (1, 2), (2, 2)]  # (dp, tp)
CASES = [  # (method, reduction, fkr)
    ("l2e", "sum", True),
    ("l2e", "mean", False),
    ("memel", "sum", False),
]


def _data():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(HIDDEN, WIDTH, generator=gen, dtype=F64)
    xs = torch.randn(STEPS, GLOBAL_TOKENS, HIDDEN, generator=gen, dtype=F64)
    targets = torch.randn(STEPS, GLOBAL_TOKENS, WIDTH, generator=gen, dtype=F64)
    feats = torch.randint(-1, NF, (STEPS, GLOBAL_TOKENS), generator=gen)
    return w0, xs, targets, feats


def _rows(micro: int, dp: int, mb: int, dp_rank: int) -> slice:
    chunk = GLOBAL_TOKENS // (micro * dp)
    start = (mb * dp + dp_rank) * chunk
    return slice(start, start + chunk)


def _run(cfg: L2EConfig, *, dp: int, tp: int, dp_rank: int, tp_rank: int, micro: int, reduce_group=None,
         tp_group=None, dp_group=None, counter: CollectiveCounter | None = None) -> list[dict]:
    """Train STEPS steps of `micro` micro-batches; per step record the state, per micro-batch masks and outputs,
    the DP-averaged W grad slice, the metrics and the collectives the step issued."""
    inh = L2EInhibitor(cfg, list(LAYERS), WIDTH, tp_rank=tp_rank, tp_size=tp, reduce_group=reduce_group,
                       tp_group=tp_group, dp_size=dp, micro_batches_per_step=micro)
    w0, xs, targets, feats = _data()
    cols = slice(tp_rank * WIDTH // tp, (tp_rank + 1) * WIDTH // tp)
    w = w0[:, cols].clone().requires_grad_()
    records = []
    for s in range(STEPS):
        if counter is not None:
            counter.counts.clear()
        masks, outs = [], []
        for mb in range(micro):
            rows = _rows(micro, dp, mb, dp_rank)
            x, target, feat = xs[s, rows], targets[s, rows, cols], feats[s, rows]
            inh.set_features(feat if cfg.fkr else None)
            pre = x @ w
            z1, z3 = F.gelu(pre), torch.tanh(pre)
            masks.append([inh.selected_mask(1, z1), inh.selected_mask(3, z3)])
            out = inh.apply(1, z1) + inh.apply(3, z3)
            # LM-like loss: mean over this rank's tokens, so the average over micro-batches and DP is the global mean.
            lm = (out * target).sum() / x.shape[0]
            ((lm + inh.regularization_loss()) / micro).backward()
            inh.finish_micro_batch()
            outs.append(out.detach())
        inh.end_step()
        grad = w.grad.clone()
        if dp_group is not None:
            dist.all_reduce(grad, group=dp_group)
            grad /= dp
        records.append({"state": inh.state_dict(), "masks": masks, "outs": outs, "grad": grad,
                        "metrics": inh.metrics(), "calls": counter.ops() if counter is not None else None,
                        "engine_collectives": inh.collective_count})
        w.grad = None
    return records


def _compare(records: list[dict], ref: list[dict], cfg: L2EConfig, *, dp: int, tp: int, dp_rank: int,
             tp_rank: int, label: str) -> None:
    assert len(records) == len(ref) == STEPS, label
    cols = slice(tp_rank * WIDTH // tp, (tp_rank + 1) * WIDTH // tp)
    selected_any = False
    for i, (got, want) in enumerate(zip(records, ref, strict=True)):
        where = f"{label} step {i}"
        for lid in LAYERS:
            g, r = got["state"]["layers"][lid], want["state"]["layers"][lid]
            for key in ("mean", "var", "tau", "half_width", "num_obs", "feat_score", "feat_count"):
                torch.testing.assert_close(g[key], r[key], rtol=1e-6, atol=1e-9, msg=f"{where} layer {lid} {key}")
            assert (g["n_merged"], g["tau_ready"], g["fkr_ready"]) == (r["n_merged"], r["tau_ready"], r["fkr_ready"])
        assert len(got["masks"]) == MICRO and len(want["masks"]) == 1, where
        for mb, (masks, out) in enumerate(zip(got["masks"], got["outs"], strict=True)):
            rows = _rows(MICRO, dp, mb, dp_rank)
            for gm, rm in zip(masks, want["masks"][0], strict=True):
                assert (gm is None) == (rm is None), where
                if gm is not None:
                    assert torch.equal(gm, rm[rows, cols]), f"{where} micro-batch {mb}: selected masks differ"
                    selected_any = selected_any or bool(gm.any())
            torch.testing.assert_close(out, want["outs"][0][rows, cols], rtol=1e-6, atol=1e-9, msg=where)
        torch.testing.assert_close(got["grad"], want["grad"][:, cols], rtol=1e-6, atol=1e-9, msg=f"{where} grad")
        assert got["metrics"].keys() == want["metrics"].keys(), where
        for key, val in want["metrics"].items():
            assert abs(got["metrics"][key] - val) <= 1e-6 * max(1.0, abs(val)), f"{where} {key}"
    assert selected_any, f"{label}: nothing was ever selected, the test would prove nothing"
    reported = set().union(*(rec["metrics"] for rec in ref))
    expected = {"l2e/layer1/selected_frac", "l2e/layer1/mean_score", "l2e/layer1/nonfinite_steps"}
    if cfg.method == "l2e":
        expected |= {"l2e/layer1/threshold", "l2e/layer1/reg"}
    if cfg.fkr:
        expected |= {"l2e/layer1/fkr", "l2e/layer3/fkr"}
    assert expected <= reported, f"{label}: metrics never reported: {expected - reported}"


def _cfg(method: str, reduction: str, fkr: bool) -> L2EConfig:
    cfg = L2EConfig(method=method, inhibit_ratio=0.1, topk=2, reg_lambda=1e-2, reduction=reduction,
                    forget_steps=2, late_start=2, fkr=fkr, num_features=NF if fkr else 0)
    cfg.validate()
    return cfg


def _worker(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    counter = CollectiveCounter().__enter__()
    try:
        for dp, tp in LAYOUTS:
            # Each layout runs on replicas of dp*tp consecutive ranks (DP=2 and TP=2 twice side by side on 4
            # ranks), so the engine must use the groups it is given. Megatron order: TP ranks are adjacent.
            # Every rank creates every group, in the same order.
            size = dp * tp
            replica, local = divmod(rank, size)
            groups = []
            for r in range(world // size):
                base = r * size
                groups.append((dist.new_group([base + i for i in range(size)]),
                               [dist.new_group([base + d * tp + t for t in range(tp)]) for d in range(dp)],
                               [dist.new_group([base + d * tp + t for d in range(dp)]) for t in range(tp)]))
            reduce_group, tp_groups, dp_groups = groups[replica]
            tp_rank, dp_rank = local % tp, local // tp
            for method, reduction, fkr in CASES:
                cfg = _cfg(method, reduction, fkr)
                ref = _run(cfg, dp=1, tp=1, dp_rank=0, tp_rank=0, micro=1)
                got = _run(cfg, dp=dp, tp=tp, dp_rank=dp_rank, tp_rank=tp_rank, micro=MICRO,
                           reduce_group=reduce_group, tp_group=tp_groups[dp_rank], dp_group=dp_groups[tp_rank],
                           counter=counter)
                label = f"rank {rank} DP={dp} TP={tp} {method}/{reduction}"
                _compare(got, ref, cfg, dp=dp, tp=tp, dp_rank=dp_rank, tp_rank=tp_rank, label=label)
                for i, rec in enumerate(got):
                    # one all_reduce per optimizer step (not per micro-batch); the W-grad all_reduce is the test's
                    dp_grad = 1  # the dp_group is passed at every layout (a 1-rank group at DP=1)
                    if method == "l2e":
                        assert rec["calls"] == {"all_reduce": 1 + dp_grad}, f"{label} step {i}: {rec['calls']}"
                        assert rec["engine_collectives"] == i + 1
                    else:  # memel: + one all_gather per layer and micro-batch for the cross-TP top-k once selecting
                        assert rec["calls"]["all_reduce"] == 1 + dp_grad
                        gathers = (0,) if tp == 1 else (0, 2 * MICRO * len(LAYERS))  # apply + selected_mask
                        assert rec["calls"].get("all_gather", 0) in gathers, f"{label} step {i}: {rec['calls']}"
    finally:
        counter.__exit__(None, None, None)
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_layouts_match_single_process():
    """One spawn of 4 ranks covers DP=2, TP=2 (each on two rank pairs at once) and TP=2 x DP=2, all with 2
    micro-batches per step, against one process taking each global batch at once."""
    os.environ["OMP_NUM_THREADS"] = "1"
    world = 4
    mp.start_processes(_worker, args=(world, free_port()), nprocs=world, start_method="spawn", join=True)
