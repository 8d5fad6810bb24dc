"""CUDA checks (marker `gpu`, skipped without a GPU; run by scripts/gpu_check.sh): bf16 logits against
transformers, the L2E engine on CUDA (its dense selection path) against the CPU run, the chunked cross entropy
on CUDA, the pinned-memory prefetch, and checkpoint save -> resume -> HF export from a bf16 run.

Each check runs in fresh processes (tests.distributed), so NCCL/gloo and megatron state never mix."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT, logged_metrics, small_run_overrides
from tests.distributed import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = str(ROOT / "configs" / "tiny.yaml")


def _bf16_logits_errors() -> dict:
    """Max |logits - fp32 reference| of our model and of transformers' GPTNeoXForCausalLM, both in bf16 on CUDA
    with the same weights (the reference: transformers in fp32)."""
    import torch.distributed as dist
    from transformers import GPTNeoXForCausalLM

    from l2e_dist.checkpoint.hf import hf_config, to_hf_state_dict
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1, device="cuda")
    try:
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                          max_position_embeddings=256)
        ours = GPTNeoX(cfg).eval()
        hf = GPTNeoXForCausalLM(hf_config(cfg, ours.padded_vocab_size)).eval()
        state = {k.replace("embed_out.", "lm_head."): v for k, v in to_hf_state_dict(ours.state_dict()).items()}
        hf.load_state_dict(state, strict=False)
        tokens = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.no_grad():
            reference = hf.cuda().float()(tokens).logits.float()
            hf_bf16 = hf.to(torch.bfloat16)(tokens).logits.float()
            ours_bf16 = ours.cuda().to(torch.bfloat16)(tokens).float()
            losses = ours(tokens[:, :-1], tokens[:, 1:])
        assert dist.get_backend() == "nccl"
        return {"ours": (ours_bf16 - reference).abs().max().item(), "hf": (hf_bf16 - reference).abs().max().item(),
                "scale": reference.abs().max().item(), "loss_dtype": str(losses.dtype),
                "loss_finite": bool(torch.isfinite(losses).all())}
    finally:
        destroy_process_groups()


def test_bf16_logits_match_transformers_on_cuda():
    (r,) = run_distributed(_bf16_logits_errors, 1)
    assert r["loss_dtype"] == "torch.float32" and r["loss_finite"], r
    assert r["ours"] <= 1.5 * r["hf"] + 1e-3 * r["scale"], r  # no worse than transformers' own bf16 error


def _chunked_loss_cuda_vs_cpu() -> dict:
    from l2e_dist.model.lm_head_loss import chunked_lm_head_loss
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1, device="cuda")
    try:
        gen = torch.Generator().manual_seed(0)
        hidden, weight = torch.randn(4, 300, 64, generator=gen), torch.randn(50304, 64, generator=gen) * 0.1
        labels = torch.randint(0, 50304, (4, 300), generator=gen)
        out = {}
        for name, device, dtype in (("cpu32", "cpu", torch.float32), ("cuda32", "cuda", torch.float32),
                                    ("cuda16", "cuda", torch.bfloat16)):
            h = hidden.to(device, dtype).requires_grad_()
            w = weight.to(device, dtype).requires_grad_()
            loss = chunked_lm_head_loss(h, w, labels.to(device), 256, "mean")
            loss.backward()
            out[name] = (loss.detach().float().cpu(), h.grad.float().cpu(), w.grad.float().cpu())
        errors = {}
        for name in ("cuda32", "cuda16"):
            for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
                ref = out["cpu32"][i]
                errors[f"{name}/{what}"] = ((out[name][i] - ref).abs().max() / ref.abs().max()).item()
        return errors
    finally:
        destroy_process_groups()


def test_chunked_cross_entropy_on_cuda_matches_cpu_fp32():
    (errors,) = run_distributed(_chunked_loss_cuda_vs_cpu, 1)
    assert max(v for k, v in errors.items() if k.startswith("cuda32")) < 1e-4, errors
    assert max(v for k, v in errors.items() if k.startswith("cuda16")) < 3e-2, errors


def _prefetch_on_cuda() -> dict:
    from l2e_dist.training.prefetch import prefetch_to_device

    batches = [[{"tokens": torch.arange(i * 10, i * 10 + 10).view(2, 5)}] for i in range(3)]
    moved = list(prefetch_to_device(iter(batches), torch.device("cuda")))
    return {"devices": sorted({m["tokens"].device.type for b in moved for m in b}),
            "equal": all(torch.equal(m["tokens"].cpu(), o["tokens"]) for b, ob in zip(moved, batches)
                         for m, o in zip(b, ob)), "n": len(moved)}


def test_prefetch_moves_batches_to_cuda_unchanged():
    (r,) = run_distributed(_prefetch_on_cuda, 1)
    assert r == {"devices": ["cuda"], "equal": True, "n": 3}


def _pretrain(overrides: list[str]) -> dict:
    from tests.conftest import pretrain_result

    result = pretrain_result(overrides)
    return {"losses": result.losses, "l2e_state": result.l2e_state, "final_step": result.final_step}


def _flatten(state, prefix="") -> dict:
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flatten(v, f"{prefix}{i}."))
    elif isinstance(state, torch.Tensor):
        out[prefix] = state.detach().float().cpu()
    elif isinstance(state, (int, float)):
        out[prefix] = torch.tensor(float(state))
    return out


def test_l2e_engine_on_cuda_equals_the_cpu_run(tmp_path, data_cache):
    """Tiny fp32 run with L2E (scoring + selection from micro-batch 3): on CUDA the inhibitor takes its dense
    selection path, on CPU the compact one; statistics, thresholds, the logged regularizer and gradient norms and
    the losses agree."""
    extra = {"l2e.method": "l2e", "l2e.late_start": 2, "train.train_iters": 6}
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        (runs[device],) = run_distributed(
            _pretrain, 1, small_run_overrides(out, data_cache, **extra, **{"parallel.device": device}))
        runs[device]["metrics"] = logged_metrics(out)
    assert runs["cuda"]["losses"] == pytest.approx(runs["cpu"]["losses"], rel=1e-4)
    cpu_state, cuda_state = _flatten(runs["cpu"]["l2e_state"]), _flatten(runs["cuda"]["l2e_state"])
    assert cpu_state.keys() == cuda_state.keys() and cpu_state
    for key in cpu_state:
        torch.testing.assert_close(cuda_state[key], cpu_state[key], rtol=1e-3, atol=1e-5, msg=key)
    for step, metrics in runs["cpu"]["metrics"].items():
        for key, value in metrics.items():
            if key.startswith("train/l2e") or key == "train/grad_norm":
                assert runs["cuda"]["metrics"][step][key] == pytest.approx(value, rel=1e-3, abs=1e-6), (step, key)


def _export(checkpoint: str, out: str) -> str:
    from l2e_dist.checkpoint.convert import export_hf

    return str(export_hf(checkpoint, out))


def _hf_loss(hf_dir: str, tokens: list) -> float:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(hf_dir).cuda().eval()
    batch = torch.tensor(tokens).cuda()
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()


def test_bf16_checkpoint_resume_and_hf_export(tmp_path, data_cache):
    """bf16 on CUDA: 6 steps straight vs 4 + resume to 6 give the same losses; the export of the resumed run
    loads in transformers on CUDA and gives a finite loss."""
    extra = {"deepspeed.precision": "bf16", "train.train_iters": 6, "train.save_interval": 4,
             "parallel.device": "cuda", "optimizer.lr": 1e-3,
             "optimizer.lr_decay_iters": 6}  # one schedule: the 4-step run is extended (run identity)
    (straight,) = run_distributed(_pretrain, 1, small_run_overrides(tmp_path / "straight", data_cache, **extra))
    (first,) = run_distributed(_pretrain, 1, small_run_overrides(
        tmp_path / "resumed", data_cache, **{**extra, "train.train_iters": 4}))
    (second,) = run_distributed(_pretrain, 1, small_run_overrides(tmp_path / "resumed", data_cache, **extra))
    assert first["final_step"] == 4 and second["final_step"] == 6
    assert second["losses"] == pytest.approx(straight["losses"][4:], rel=2e-3)
    hf_dir = run_distributed(_export, 1, str(tmp_path / "resumed"), str(tmp_path / "hf"))[0]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt_neox"
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0)).tolist()
    loss = run_distributed(_hf_loss, 1, hf_dir, tokens)[0]
    assert loss == loss and loss < 20.0
