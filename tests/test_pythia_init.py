"""Every Pythia size initialises as Pythia did (gpt-neox megatron/model/init_functions.py, neox_args defaults):
70m..2.8b small_init sqrt(2 / (5 h)) + wang_init 2 / (L sqrt(h)); 6.9b and 12b, whose yml set no init method,
gpt-neox's defaults normal(0.02) + scaled_normal(0.02 / sqrt(2 L)). init_method goes to the embedding, QKV,
h_to_4h and the output layer; output_layer_init_method to attention.dense and 4h_to_h; biases are zero and
LayerNorms (1, 0).

The expected std of every tensor is computed here from (h, L) of each shipped config. A 12B model cannot be
built on this machine, so: (1) every size's two stds from the config, (2) which tensor gets which std on a small
model built by the real code, for both schemes, measured, and (3) one full-width transformer layer of
pythia-12b materialised and measured.
"""

from __future__ import annotations

import math

import pytest
import torch

from l2e_dist.config import load_config
from tests.conftest import ROOT

SIZES = ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
GPT_NEOX_DEFAULTS = {"6.9b", "12b"}  # their yml set no init-method (Pythia README erratum)


def expected_stds(size: str, hidden: int, layers: int) -> tuple[float, float]:
    if size in GPT_NEOX_DEFAULTS:
        return 0.02, 0.02 / math.sqrt(2 * layers)  # init_method_normal(0.02), scaled_init_method_normal
    return math.sqrt(2 / (5 * hidden)), 2 / (layers * math.sqrt(hidden))  # small_init, wang_init


def which_std(name: str) -> str:
    """gpt-neox: output_layer_init_method for the residual-branch outputs, init_method for every other matrix."""
    if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
        return "out"
    if name.endswith("weight") and ("layernorm" in name or "layer_norm" in name):
        return "one"
    if name.endswith("bias"):
        return "zero"
    return "in"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["", "-deduped"])
def test_every_size_has_pythias_init_stds(size, variant):
    model = load_config([str(ROOT / "configs" / f"pythia-{size}{variant}.yaml")]).model
    assert model.init_stds() == pytest.approx(expected_stds(size, model.hidden_size, model.num_layers), rel=1e-12)


def _measured_stds(model_overrides: list[dict], full_layer: dict | None) -> list[dict]:
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX, ParallelResidualLayer, init_methods, megatron_config
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)  # a world of one, in the test process
    try:
        out = []
        for overrides in model_overrides:
            torch.manual_seed(0)
            model = GPTNeoX(ModelConfig(**overrides))
            out.append({n: (p.float().std().item(), p.float().mean().item(), p.abs().max().item())
                        for n, p in model.named_parameters()})
        if full_layer is not None:
            cfg = ModelConfig(**full_layer)
            torch.manual_seed(0)
            layer = ParallelResidualLayer(cfg, megatron_config(cfg), *init_methods(cfg))
            out.append({n: (p.float().std().item(), p.float().mean().item(), p.abs().max().item())
                        for n, p in layer.named_parameters()})
        return out
    finally:
        destroy_process_groups()


def _check(measured: dict, std_in: float, std_out: float, rel: float) -> None:
    assert measured
    for name, (std, mean, largest) in measured.items():
        kind = which_std(name)
        if kind == "zero":
            assert largest == 0.0, name
        elif kind == "one":
            assert (std, mean) == (0.0, 1.0), name
        else:
            assert std == pytest.approx(std_in if kind == "in" else std_out, rel=rel), name
            assert abs(mean) < 4 * std / 100, name


SMALL = dict(num_layers=3, hidden_size=96, num_attention_heads=4, vocab_size=500, max_position_embeddings=32)


@pytest.mark.slow
def test_the_model_gives_each_tensor_its_init_and_a_full_width_pythia_12b_layer_matches():
    schemes = [{}, {"init_method": "normal", "output_layer_init_method": "scaled_normal", "init_std": 0.02}]
    twelve_b = load_config([str(ROOT / "configs" / "pythia-12b.yaml")]).model
    full_layer = {k: getattr(twelve_b, k) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "init_method", "output_layer_init_method", "init_std")}
    *small, layer = _measured_stds([{**SMALL, **s} for s in schemes], {**full_layer, "vocab_size": 500})
    h, n = SMALL["hidden_size"], SMALL["num_layers"]
    names = set(small[0])
    assert {"embed_in.weight", "embed_out.weight", "layers.0.attention.query_key_value.weight",
            "layers.2.mlp.dense_4h_to_h.weight", "final_layer_norm.weight"} <= names
    _check(small[0], math.sqrt(2 / (5 * h)), 2 / (n * math.sqrt(h)), rel=0.05)  # >= 9k samples per matrix
    _check(small[1], 0.02, 0.02 / math.sqrt(2 * n), rel=0.05)
    assert len(layer) == 12
    std_in, std_out = expected_stds("12b", twelve_b.hidden_size, twelve_b.num_layers)
    _check(layer, std_in, std_out, rel=0.005)  # >= 26M samples per matrix
