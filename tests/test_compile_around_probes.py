"""`train.compile` with L2E on: each layer is compiled in two fullgraph halves around its MLP activation, whose
probes (the L2E hooks) run eagerly in between. While the engine's mean, variance and tau change every step
(collecting, calibrating, selecting), Dynamo compiles a fixed set of graphs with no graph break, and the compiled
model trains exactly like the eager one."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

STEPS = 8
LATE_START = 2  # steps 0-1 collect, step 2 calibrates tau, steps 3-7 select (the L2E term is on)
VOCAB, TOKENS = 64, 9


def _train_eager_and_compiled(num_layers: int, use_parallel_residual: bool, activation_checkpointing: bool,
                              l2e_backend: str) -> list:
    """The same tiny model trained STEPS steps eagerly and compiled (backend aot_eager, through a compile counter),
    each with its own L2E engine (`l2e_backend`: "dense" as on GPUs, or "cpu") on every layer. Per step: both runs' loss, L2E term, gradients and engine
    state, and Dynamo's counts so far."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from l2e_dist.l2e.config import L2EConfig
    from l2e_dist.l2e.hooks import attach
    from l2e_dist.l2e.inhibitor import L2EInhibitor
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)
    try:
        torch._dynamo.reset()
        counters.clear()
        cfg = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=16, use_parallel_residual=use_parallel_residual)
        torch.manual_seed(0)
        eager = GPTNeoX(cfg)
        torch.manual_seed(0)
        compiled = GPTNeoX(cfg)
        counter = CompileCounterWithBackend("aot_eager")
        compiled.compile_layers(backend=counter)
        assert compiled.state_dict().keys() == eager.state_dict().keys()
        assert all(torch.equal(p, q) for p, q in zip(compiled.parameters(), eager.parameters(), strict=True))
        layers = list(range(num_layers))
        l2e = L2EConfig(method="l2e", layers=layers, late_start=LATE_START, reg_lambda=1e-3, inhibit_ratio=0.05)
        runs = []
        for model in (eager, compiled):
            model.activation_checkpointing = activation_checkpointing
            inhibitor = L2EInhibitor(l2e, layers, cfg.ffn_size, backend=l2e_backend)
            attach(inhibitor, model.mlp_probes(l2e.activation))
            runs.append((model, inhibitor, torch.optim.SGD(model.parameters(), lr=0.1)))
        gen = torch.Generator().manual_seed(1)
        steps = []
        for _ in range(STEPS):
            tokens = torch.randint(0, VOCAB, (2, TOKENS), generator=gen)
            results = []
            for model, inhibitor, optimizer in runs:
                with inhibitor.micro_batch() as micro_batch:
                    lm_loss = model(tokens[:, :-1], tokens[:, 1:], reduction="mean")
                    l2e_term = micro_batch.loss()
                    (lm_loss + l2e_term).backward()
                grads = {name: p.grad.clone() for name, p in model.named_parameters()}
                optimizer.step()
                optimizer.zero_grad()
                inhibitor.end_step()
                results.append({"loss": lm_loss.item(), "l2e_term": float(l2e_term), "grads": grads,
                                "state": inhibitor.state_dict()["layers"]})
            steps.append({"eager": results[0], "compiled": results[1], "frames": counter.frame_count,
                          "unique_graphs": counters["stats"]["unique_graphs"],
                          "graph_breaks": sum(counters["graph_break"].values())})
        return steps
    finally:
        destroy_process_groups()


@pytest.mark.slow
@pytest.mark.parametrize("num_layers, use_parallel_residual, activation_checkpointing, l2e_backend",
                         [(2, True, False, "dense"), (2, False, True, "dense"), (10, True, True, "dense"),
                          (2, True, False, "cpu")])
def test_compiled_layers_keep_a_fixed_graph_count_while_l2e_state_changes(
        num_layers, use_parallel_residual, activation_checkpointing, l2e_backend):
    steps = run_distributed(_train_eager_and_compiled, 1, num_layers, use_parallel_residual,
                            activation_checkpointing, l2e_backend)[0]

    # the run went through the phases where the compiled-in state would change: mu/var every step, tau once
    # calibrated, the L2E term on from the first selecting step
    states = [s["eager"]["state"][0] for s in steps]
    assert all(not torch.equal(a["mean"], b["mean"]) for a, b in zip(states, states[1:]))
    taus = [float(s["tau"]) for s in states[LATE_START:]]
    assert len(set(taus)) == len(taus), taus
    assert [s["eager"]["l2e_term"] != 0.0 for s in steps] == [step > LATE_START for step in range(STEPS)]

    # Dynamo: no graph break, and the graphs of the first step serve every later one (in every layer)
    assert all(s["graph_breaks"] == 0 for s in steps)
    # (two graphs: the layer's halves before and after the activation, shared by all layers of the same shape)
    frames = [s["frames"] for s in steps]
    assert frames == [2] * STEPS, frames
    assert [s["unique_graphs"] for s in steps] == [2] * STEPS

    # and the compiled model trains as the eager one
    for step in steps:
        eager, compiled = step["eager"], step["compiled"]
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5)
        assert compiled["l2e_term"] == pytest.approx(eager["l2e_term"], rel=1e-5, abs=1e-9)
        for name, grad in eager["grads"].items():  # fp32 rounding, drifting a little over the steps
            assert _relative_error(compiled["grads"][name], grad) < 1e-5, name
        for layer, state in eager["state"].items():
            for key in ("mean", "var", "tau"):
                assert _relative_error(compiled["state"][layer][key], state[key]) < 1e-5, (layer, key)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("rotary_dims", [0, 4, 16])
def test_split_qkv_rotary_compiles_without_graph_breaks_to_the_eager_values(rotary_dims):
    """Under torch.compile the split + rotary takes its plain form (the hand-written function's out= writes break
    Dynamo's graph): values and gradients equal the eager hand-written function in float64."""
    from l2e_dist.model.gpt_neox import RotaryEmbedding, split_qkv_rotary

    b, s, heads, hd = 2, 7, 3, 16
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, s, heads, 3 * hd, dtype=torch.float64, generator=gen, requires_grad=True)
    grads_out = [torch.randn(b, heads, s, hd, dtype=torch.float64, generator=gen) for _ in range(3)]
    cos, sin = RotaryEmbedding(rotary_dims, 10000)(s, qkv.device) if rotary_dims else (torch.ones(s, 0),) * 2

    eager = split_qkv_rotary(qkv, cos, sin, rotary_dims)
    compiled = torch.compile(split_qkv_rotary, backend="aot_eager", fullgraph=True)(qkv, cos, sin, rotary_dims)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(compiled, qkv, grads_out), torch.autograd.grad(eager, qkv, grads_out)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _loss_and_gradients(compile_layers: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward + backward of a tiny model on this rank (eager or with compile_layers, backend aot_eager)."""
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(2)
    try:
        cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                          max_position_embeddings=16)
        torch.manual_seed(0)
        model = GPTNeoX(cfg)
        if compile_layers:
            model.compile_layers(backend="aot_eager")
        tokens = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(1))
        loss = model(tokens[:, :-1], tokens[:, 1:], reduction="mean")
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        destroy_process_groups()


@pytest.mark.slow
def test_compiled_layers_at_tp2_equal_eager():
    """At TP=2 megatron-core's layers break the halves' graphs (no fullgraph there): still the eager values."""
    eager = run_distributed(_loss_and_gradients, 2, False)
    compiled = run_distributed(_loss_and_gradients, 2, True)
    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled, strict=True):
        assert loss == pytest.approx(eager_loss, rel=1e-6)
        for name, grad in eager_grads.items():
            assert _relative_error(grads[name], grad) < 1e-5, name



def test_compile_with_zero3_is_a_config_error():
    """ZeRO-3 + train.compile failed at the first forward (Dynamo traces the partitioned, empty parameters under
    the old whole-layer compile too): one config error at load, naming the fix."""
    from l2e_dist.config import load_config
    from l2e_dist.config_utils import ConfigError
    from tests.conftest import ROOT

    tiny = str(ROOT / "configs" / "tiny.yaml")
    load_config([tiny], ["train.compile=true", "deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="train.compile.*deepspeed.zero_stage=3.*set train.compile=false"):
        load_config([tiny], ["train.compile=true", "deepspeed.zero_stage=3"])
