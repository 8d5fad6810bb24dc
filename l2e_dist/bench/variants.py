"""The benchmarked variants: our training step under DeepSpeed (built as the trainer builds it) and the same weights
in transformers' GPTNeoXForCausalLM trained by a plain torch AdamW loop."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from l2e_dist.checkpoint.hf import hf_config, to_hf_state_dict
from l2e_dist.config import RunConfig
from l2e_dist.model.gpt_neox import GPTNeoX
from l2e_dist.parallel.batching import accumulation_steps
from l2e_dist.parallel.state import current_layout
from l2e_dist.training.optim import build_optimizer, build_scheduler, initialize_engine
from l2e_dist.training.trainer import build_inhibitor, end_l2e_step, seed_everything, train_micro_batch


@dataclass
class Variant:
    name: str
    step: Any  # callable(tokens [grad_accum_steps, micro, seq+1]) -> loss float tensor (detached)
    state_roots: list[Any]
    inhibitor: Any = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_mem: list[int] = field(default_factory=list)
    collectives: Counter = field(default_factory=Counter)
    first_loss: float | None = None


def initial_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The initial weights every variant starts from (our model built with the run's seed), under HF names."""
    seed_everything(cfg.train.seed)
    return to_hf_state_dict(GPTNeoX(cfg.model).state_dict())


def build_ours(cfg: RunConfig, device: torch.device) -> Variant:
    """Our step as the trainer builds it (model, L2E inhibitor, DeepSpeed engine), minus data and logging."""
    layout = current_layout()
    grad_accum_steps = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, 1)
    seed_everything(cfg.train.seed)
    model = GPTNeoX(cfg.model)
    if cfg.train.compile:
        model.compile_layers()
    inhibitor = build_inhibitor(cfg, model, layout, grad_accum_steps, device, always_reduce=True)
    engine = initialize_engine(model, cfg, layout.dp_size)
    engine.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step(batch: torch.Tensor) -> torch.Tensor:
        # The trainer's inner loop (l2e_dist/training/trainer.py: pretrain), minus data loading and logging.
        loss_sum.zero_()
        for tokens in batch:
            lm_loss = train_micro_batch(engine, inhibitor, tokens)
            loss_sum.add_(lm_loss.detach().double() / grad_accum_steps)
        end_l2e_step(engine, inhibitor)
        return loss_sum

    roots = [list(engine.module.parameters()), [p.grad for p in engine.module.parameters()], vars(engine.optimizer)]
    inner = getattr(engine.optimizer, "optimizer", None)
    if inner is not None:
        roots.append(vars(inner))
    return Variant(cfg.l2e.method, step, roots, inhibitor)


def build_hf(cfg: RunConfig, device: torch.device, weights: dict) -> Variant:
    """The same weights in transformers' GPTNeoXForCausalLM, trained by a plain torch AdamW loop."""
    from transformers import GPTNeoXForCausalLM  # deferred: a slow import

    padded = cfg.model.padded_vocab_size(1)
    model = GPTNeoXForCausalLM(hf_config(cfg.model, padded))
    state = {("lm_head." + k[len("embed_out."):] if k.startswith("embed_out.") else k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("inv_freq") for k in missing):
        raise RuntimeError(f"HF weights do not map 1:1: missing {missing}, unexpected {unexpected}")
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    grad_accum_steps = accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, 1)
    clip = cfg.optimizer.grad_clip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.deepspeed.precision == "bf16")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def step(batch: torch.Tensor) -> torch.Tensor:
        loss_sum.zero_()
        for tokens in batch:
            inputs, labels = tokens[:, :-1], tokens[:, 1:].contiguous()  # HF views labels flat
            with autocast:
                loss = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            (loss / grad_accum_steps).backward()
            loss_sum.add_(loss.detach().double() / grad_accum_steps)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    return Variant("hf", step, [list(model.parameters()), vars(optimizer)])


def build_variants(cfgs: dict[str, RunConfig], device: torch.device) -> dict[str, Variant]:
    return {
        name: build_hf(cfg, device, initial_weights(cfg)) if name == "hf" else build_ours(cfg, device)
        for name, cfg in cfgs.items()
    }

