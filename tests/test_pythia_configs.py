"""The shipped Pythia configs hold Pythia's published values (EleutherAI/pythia models/*/pythia-*.yml and the
paper's table), and each size file holds only what differs from configs/base/pythia.yaml."""

from pathlib import Path

import pytest
import yaml

from l2e_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# size: (layers, hidden, heads, lr, model-parallel size, precision)
# (init: small_init + wang_init for 70m..2.8b; gpt-neox's defaults normal + scaled_normal for 6.9b and 12b, whose
# yml set no init method; the stds per tensor are checked in test_pythia_init.py)
GPT_NEOX_DEFAULT_INIT = {"6.9b", "12b"}
PUBLISHED = {
    "70m": (6, 512, 8, 1.0e-3, 1, "fp16"),
    "160m": (12, 768, 12, 6.0e-4, 1, "fp16"),
    "410m": (24, 1024, 16, 3.0e-4, 1, "fp16"),
    "1b": (16, 2048, 8, 2.5e-4, 1, "bf16"),  # the one standard model Pythia trained in bf16
    "1.4b": (24, 2048, 16, 2.0e-4, 1, "fp16"),
    "2.8b": (32, 2560, 32, 1.6e-4, 1, "fp16"),
    "6.9b": (32, 4096, 32, 1.2e-4, 2, "fp16"),
    "12b": (36, 5120, 40, 1.2e-4, 4, "fp16"),
}
# PolyPythia's smallest sizes (EleutherAI/pythia models/14M, 31M): standard Pile only, ZeRO stage 0, fp16
# size: (layers, hidden, heads, lr)
SMALL = {"14m": (6, 128, 4, 1.0e-3), "31m": (6, 256, 8, 1.0e-3)}


def test_every_size_is_shipped():
    sizes = {p.stem.removeprefix("pythia-") for p in (ROOT / "configs").glob("pythia-*.yaml")
             if not p.stem.endswith("-deduped")}
    assert sizes == set(PUBLISHED) | set(SMALL)


@pytest.mark.parametrize("size", SMALL)
def test_small_sizes_and_the_seeded_order_overlay(size):
    layers, hidden, heads, lr = SMALL[size]
    cfg = load_config([str(ROOT / "configs" / f"pythia-{size}.yaml")])
    m, t, o = cfg.model, cfg.train, cfg.optimizer
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (layers, hidden, heads)
    assert (m.rotary_pct, m.use_parallel_residual, t.seq_length, t.global_batch_size) == (0.25, True, 2048, 1024)
    assert o.lr == pytest.approx(lr) and (o.warmup_fraction, o.lr_decay_iters) == (0.01, 143000)
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision, cfg.parallel.tensor_parallel) == (0, "fp16", 1)
    assert t.output_dir == f"runs/pythia-{size}"
    seeded = load_config([str(ROOT / "configs" / f"pythia-{size}.yaml"),
                          str(ROOT / "configs" / "data" / "pythia_seed_index_maps.yaml")],
                         ["data.index_maps=data/pythia/index-maps/seed3"])
    d = seeded.data
    assert (d.order, d.order_batch_size, d.split, d.index_maps) == ("pythia_index_maps", 1024, "1,0,0",
                                                                     "data/pythia/index-maps/seed3")
    assert d.paths == ["data/pythia/pile-unshuffled/pile_20B_tokenizer_text_document"]


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_values(size):
    layers, hidden, heads, lr, tp, precision = PUBLISHED[size]
    for variant in ("", "-deduped"):
        cfg = load_config([str(ROOT / "configs" / f"pythia-{size}{variant}.yaml")])
        m, t, o = cfg.model, cfg.train, cfg.optimizer
        assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (layers, hidden, heads)
        assert m.intermediate_size in (None, 4 * hidden)
        assert (m.rotary_pct, m.rotary_base, m.layernorm_eps, m.use_parallel_residual) == (0.25, 10000, 1e-5, True)
        assert (m.max_position_embeddings, m.make_vocab_size_divisible_by) == (2048, 128)
        assert (t.seq_length, t.global_batch_size, t.train_iters) == (2048, 1024, 143000)
        assert (t.save_interval, t.save_schedule) == (1000, "pythia")
        assert o.lr == pytest.approx(lr) and o.min_lr_ratio == pytest.approx(0.1)
        assert (o.warmup_fraction, o.lr_decay_iters, o.decay_style) == (0.01, 143000, "cosine")
        assert o.schedule == "annealing_lr_d36f623"  # gpt-neox d36f623's AnnealingLR (test_pythia_lr.py)
        init = ("normal", "scaled_normal", 0.02) if size in GPT_NEOX_DEFAULT_INIT else ("small_init", "wang_init")
        assert (m.init_method, m.output_layer_init_method, m.init_std)[: len(init)] == init
        assert m.gelu_approximate == "tanh"  # bias-gelu-fusion, whatever the published config.json says
        assert cfg.l2e.method == "none"  # the overlay switches it on; the level per size: test_pythia_l2e_levels.py
        assert (list(o.betas), o.eps, o.weight_decay, o.grad_clip) == ([0.9, 0.95], 1e-8, 0.1, 1.0)
        assert cfg.parallel.tensor_parallel == tp
        assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (1, "fp16" if variant else precision)
        assert t.output_dir == f"runs/pythia-{size}{variant}"


@pytest.mark.parametrize("size", [*PUBLISHED, *SMALL])
def test_size_files_hold_only_what_differs(size):
    base = yaml.safe_load((ROOT / "configs" / "base" / "pythia.yaml").read_text())
    own = yaml.safe_load((ROOT / "configs" / f"pythia-{size}.yaml").read_text())
    assert own.pop("include") == ["base/pythia.yaml"]
    repeated = [f"{section}.{key}" for section, values in own.items() for key, value in values.items()
                if key in base.get(section, {}) and base[section][key] == value]
    assert not repeated, f"pythia-{size}.yaml repeats base values: {repeated}"
