"""The in-process steps of scripts/gpu_check.sh, all in ONE process (one torch/deepspeed/megatron import, one
CUDA context): each step writes OUT_DIR/<step>.json as soon as it is done, so a check killed later still returns
what it measured.

    python3 scripts/gpu_check_steps.py OUT_DIR DEVICE     # DEVICE: cuda (the check) or cpu (its CPU smoke)

Steps:
- env: python, torch (+ CUDA, cuDNN, NCCL), deepspeed, megatron-core, transformers versions and where each was
  imported from (the carried wheels or the image), the GPU's name and its MFU peak.
- nccl: a world of 1 through the NCCL backend (gloo on CPU): the backend in use, an all_reduce, and the L2E
  statistics reduction over it (the inhibitor with its reduce group vs without one: the same state).
- logits: our model vs transformers' GPTNeoXForCausalLM in bf16, each against transformers in fp32 (goal: ours no
  worse than 1.5 x transformers' own bf16 error).
Exit 1 when a step failed (its JSON says why), 0 otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def write_step(out: Path, name: str, record: dict) -> None:
    from l2e_dist.fileio import atomic_write_json

    atomic_write_json(out / f"{name}.json", record, durable=False, default=str)
    print(f"gpu_check_steps: {name} {'ok' if record.get('ok') else 'FAILED'} ({record.get('seconds', 0):.1f}s)",
          flush=True)


def env_step(device: torch.device) -> dict:
    versions, origins = {"python": sys.version.split()[0], "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda}, {}
    for name, module in (("deepspeed", "deepspeed"), ("megatron_core", "megatron.core"),
                         ("transformers", "transformers"), ("datasets", "datasets")):
        try:
            mod = importlib.import_module(module)
            versions[name] = getattr(mod, "__version__", None)
            origins[name] = os.path.dirname(mod.__file__)
        except ImportError as exc:
            versions[name], origins[name] = None, f"not importable: {exc}"
    if versions["megatron_core"] is None and origins["megatron_core"].startswith("/"):
        from megatron.core.package_info import __version__ as megatron_version

        versions["megatron_core"] = megatron_version
    record = {"versions": versions, "imported_from": origins, "device": str(device)}
    if device.type == "cuda":
        from l2e_dist.training.throughput import device_peak_tflops

        record.update(device_name=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                      nccl=".".join(map(str, torch.cuda.nccl.version())), peak_tflops=device_peak_tflops(device),
                      capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    record["torch_supported"] = (2, 11) <= (major, minor) <= (2, 13)  # the range the project runs on
    record["ok"] = all(versions[k] for k in ("deepspeed", "megatron_core", "transformers")) and record["torch_supported"]
    return record


def _tiny_model_config():
    from l2e_dist.model.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, vocab_size=512,
                       max_position_embeddings=128)


def nccl_step(device: torch.device) -> dict:
    """The NCCL backend in a world of 1 and L2E's statistics reduction over it."""
    import torch.distributed as dist

    from l2e_dist.config import RunConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import current_layout
    from l2e_dist.training.trainer import build_inhibitor

    backend = dist.get_backend()
    value = torch.ones(4, device=device)
    dist.all_reduce(value)
    layout = current_layout()
    cfg = RunConfig()
    cfg.model = _tiny_model_config()
    cfg.l2e.method, cfg.l2e.forget_steps, cfg.l2e.late_start = "l2e", 2, 1
    tokens = torch.randint(0, 512, (3, 2, 65), generator=torch.Generator().manual_seed(0)).to(device)
    states = {}
    for reduce in (True, False):
        torch.manual_seed(0)
        model = GPTNeoX(cfg.model).to(device)
        inhibitor = build_inhibitor(cfg, model, layout, 1, device, always_reduce=reduce)
        for step, batch in enumerate(tokens, 1):
            loss = model(batch[:, :-1], batch[:, 1:], reduction="mean") + inhibitor.regularization_loss()
            loss.backward()
            inhibitor.finish_micro_batch()
            inhibitor.end_step(applied=True, step=step)
        states[reduce] = {k: v.detach().float().cpu() for k, v in _flatten(inhibitor.state_dict()).items()}
    differences = {k: (states[True][k] - states[False][k]).abs().max().item() for k in states[False]
                   if states[False][k].numel()}
    worst = max(differences.values(), default=float("inf"))
    return {"backend": backend, "all_reduce_ok": bool((value == 1).all().item()), "world_size": dist.get_world_size(),
            "l2e_state_entries": len(differences), "l2e_max_abs_difference": worst,
            "ok": backend == ("nccl" if device.type == "cuda" else "gloo") and bool((value == 1).all().item())
            and bool(differences) and worst <= 1e-6}


def _flatten(state, prefix: str = "") -> dict:
    out = {}
    if isinstance(state, dict):
        for key, value in state.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            out.update(_flatten(value, f"{prefix}{i}."))
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        out[prefix] = state
    return out


def logits_step(device: torch.device) -> dict:
    """bf16 logits of our model and of transformers, each against transformers in fp32 (same weights)."""
    from transformers import GPTNeoXForCausalLM

    from l2e_dist.checkpoint.hf import hf_config, to_hf_state_dict
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                      max_position_embeddings=256)
    ours = GPTNeoX(cfg).eval()
    hf = GPTNeoXForCausalLM(hf_config(cfg, ours.padded_vocab_size)).eval()
    state = {k.replace("embed_out.", "lm_head."): v for k, v in to_hf_state_dict(ours.state_dict()).items()}
    hf.load_state_dict(state, strict=False)
    tokens = torch.randint(0, 1000, (2, 200), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        reference = hf.to(device).float()(tokens).logits.float()
        hf_bf16 = hf.to(torch.bfloat16)(tokens).logits.float()
        ours_bf16 = ours.to(device).to(torch.bfloat16)(tokens).float()
        loss = ours(tokens[:, :-1], tokens[:, 1:])
    ours_error = (ours_bf16 - reference).abs().max().item()
    hf_error = (hf_bf16 - reference).abs().max().item()
    scale = reference.abs().max().item()
    goal = 1.5 * hf_error + 1e-3 * scale
    return {"ours_max_abs_error": ours_error, "transformers_max_abs_error": hf_error, "logit_scale": scale,
            "goal": f"ours <= 1.5 x transformers' bf16 error + 1e-3 x scale = {goal:.4g}",
            "loss_dtype": str(loss.dtype), "loss_finite": bool(torch.isfinite(loss).all().item()),
            "ok": ours_error <= goal and loss.dtype == torch.float32 and bool(torch.isfinite(loss).all().item())}


STEPS = {"env": env_step, "nccl": nccl_step, "logits": logits_step}


def main(out_dir: str, device_name: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from l2e_dist.parallel.state import default_device, destroy_process_groups, init_process_groups

    failed = []
    started = time.perf_counter()
    try:
        init_process_groups(1, timeout_s=120.0, device=device_name)
    except Exception as exc:  # recorded as the nccl step's failure; env still runs
        init_error = f"{type(exc).__name__}: {exc}"
    else:
        init_error = None
    init_s = time.perf_counter() - started
    device = default_device() if init_error is None else torch.device(device_name)
    for name, run in STEPS.items():
        t0 = time.perf_counter()
        try:
            if name != "env" and init_error is not None:
                raise RuntimeError(f"process group initialisation failed: {init_error}")
            record = run(device)
        except Exception as exc:
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        record["seconds"] = time.perf_counter() - t0 + (init_s if name == "nccl" else 0.0)
        write_step(out, name, record)
        if not record["ok"]:
            failed.append(name)
    if init_error is None:
        destroy_process_groups()
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("cuda", "cpu"):
        print("usage: gpu_check_steps.py OUT_DIR cuda|cpu", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
