"""Branching from a published Pythia HF revision, as EleutherAI publishes it.

The replica: config.json with every field of Pythia's published pythia-70m config.json (transformers 4.24 era:
"hidden_act": "gelu", though Pythia trained with the tanh GELU) at tiny dimensions but Pythia's vocabulary
(50304 rows for the GPT-NeoX-20B tokenizer's 50277 tokens), fp16 weights under Pythia's tensor names with the
buffers its files carry (causal mask, masked_bias, rotary inv_freq), once as model.safetensors and once as
pytorch_model.bin. A Pythia run config (model.gelu_approximate: tanh) branches from it at step N: its first
step's loss (before any update) must be the loss transformers computes for that checkpoint on global batch N
with the tanh GELU Pythia trained with, and not the one with the exact GELU the label names.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from l2e_dist.checkpoint.manifest import CheckpointError
from tests.conftest import ROOT, logged_metrics
from tests.distributed import run_distributed
from tests.test_pythia_order import global_batches, read_samples, write_preshuffled, write_tokenizer

SEQ, GBS, MICRO, BATCHES = 16, 8, 2, 8
PYTHIA_TOKENS = 50277  # the GPT-NeoX-20B tokenizer; Pythia's embeddings are padded to 50304
BRANCH = 3

# EleutherAI/pythia-70m config.json (every revision), with tiny dimensions for hidden_size, intermediate_size,
# num_attention_heads and num_hidden_layers.
PUBLISHED_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "classifier_dropout": 0.1,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}
# The fields later transformers versions add when they re-save a GPTNeoXConfig (values as Pythia's).
RESAVED_FIELDS = {"attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0}


SCALES = {"dense_h_to_4h": 0.1, "dense_4h_to_h": 30.0, "lm_head": 5.0}  # std per module (0.1 elsewhere)
GELU_GAP = -3.0  # gelu_pytorch_tanh(-3) - gelu(-3) = 4.1e-4, 10% of gelu(-3)


def pythia_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """fp16 tensors under the names of Pythia's published files. The neurons' pre-activations sit near -3, where
    the tanh GELU differs from the exact one by 10%, and the MLP output dominates the residual stream, so the
    loss depends visibly on which GELU runs."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(**{k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("architectures", "torch_dtype")})
    model = GPTNeoXForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        value = torch.randn_like(tensor) * SCALES.get(name.rsplit(".", 2)[-2], 0.1)
        if name.endswith("dense_h_to_4h.bias"):
            value = value + GELU_GAP  # the pre-activations sit where the two GELUs differ most
        if "layernorm" in name and name.endswith("weight"):
            value = 1 + value
        state["embed_out.weight" if name == "lm_head.weight" else name] = value.half()
    for i in range(PUBLISHED_CONFIG["num_hidden_layers"]):  # the buffers transformers 4.24 saved with them
        prefix = f"gpt_neox.layers.{i}.attention."
        state[prefix + "bias"] = torch.tril(torch.ones(2048, 2048, dtype=torch.bool)).view(1, 1, 2048, 2048)
        state[prefix + "masked_bias"] = torch.tensor(-1e9).half()
        head_dim = PUBLISHED_CONFIG["hidden_size"] // PUBLISHED_CONFIG["num_attention_heads"]
        rotary = int(head_dim * PUBLISHED_CONFIG["rotary_pct"])
        state[prefix + "rotary_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)).half()
    return state


def write_pythia_revision(directory: Path, weights_file: str, config: dict, seed: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = pythia_state_dict(seed)
    if weights_file == "model.safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / weights_file), metadata={"format": "pt"})
    else:
        torch.save(state, directory / weights_file)
    write_tokenizer(directory / "tokenizer.json", PYTHIA_TOKENS)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pythia-branch")
    write_preshuffled(root / "document", GBS * (BATCHES + 1), SEQ + 1)
    write_tokenizer(root / "tokenizer.json", PYTHIA_TOKENS)
    return {"root": root, "prefix": root / "document", "tokenizer": root / "tokenizer.json"}


def branch_overrides(corpus: dict[str, Path], out: Path, revision: Path, **extra) -> list[str]:
    """configs/pythia-70m.yaml as shipped (tanh GELU, Pythia's lr schedule, file order), at the replica's size."""
    values = {
        "model.num_layers": PUBLISHED_CONFIG["num_hidden_layers"],
        "model.hidden_size": PUBLISHED_CONFIG["hidden_size"],
        "model.num_attention_heads": PUBLISHED_CONFIG["num_attention_heads"],
        "train.seq_length": SEQ, "train.global_batch_size": GBS, "train.micro_batch_size": MICRO,
        "train.train_iters": BRANCH + 2, "train.log_interval": 1, "train.eval_interval": 0,
        "train.save_interval": 0, "train.save_schedule": "interval", "train.output_dir": str(out),
        "train.init_from": str(revision), "train.branch_step": BRANCH,
        "data.paths": f"[{corpus['prefix']}]", "data.tokenizer": str(corpus["tokenizer"]),
        "data.order": "pythia", "data.order_batch_size": GBS, "data.split": f"{BATCHES},1,0",
        "data.cache_dir": str(corpus["root"] / "cache"), "data.labels": "false",
        "deepspeed.precision": "fp32", "logging.progress_bar": False, "logging.tensorboard": False,
        "parallel.device": "cpu",  # the Pythia configs say cuda
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _branch(overrides: list[str]) -> dict:
    """pretrain() with configs/pythia-70m.yaml + overrides, recording each micro-batch and the lr it ran at."""
    import torch.distributed as dist

    import l2e_dist.training.trainer as trainer
    from l2e_dist.config import load_config
    from l2e_dist.parallel.state import destroy_process_groups

    seen, lrs = [], []
    original = trainer.train_micro_batch

    def recording(engine, inhibitor, tokens, *rest):
        seen.append(tokens.clone().numpy())
        lrs.append(engine.get_lr()[0])
        return original(engine, inhibitor, tokens, *rest)

    trainer.train_micro_batch = recording
    dist.init_process_group("gloo")
    try:
        cfg = load_config([str(ROOT / "configs" / "pythia-70m.yaml")], overrides)
        assert cfg.model.gelu_approximate == "tanh"
        trainer.pretrain(cfg)
    finally:
        destroy_process_groups()
    return {"micro_batches": seen, "lrs": lrs}


def transformers_loss(revision: Path, batch: np.ndarray, hidden_act: str) -> float:
    """Mean next-token loss of the revision on `batch` in fp32, by transformers, with the given activation."""
    from transformers import AutoConfig, GPTNeoXForCausalLM

    config = AutoConfig.from_pretrained(str(revision))
    config.hidden_act = hidden_act
    model = GPTNeoXForCausalLM.from_pretrained(str(revision), config=config, dtype=torch.float32).eval()
    tokens = torch.from_numpy(batch)
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()


@pytest.mark.slow
@pytest.mark.parametrize("weights_file, config", [
    ("model.safetensors", PUBLISHED_CONFIG),
    ("pytorch_model.bin", {**PUBLISHED_CONFIG, **RESAVED_FIELDS}),
], ids=["safetensors", "pytorch_model.bin"])
def test_first_branched_step_has_the_loss_pythia_trained_with(corpus, tmp_path, weights_file, config):
    revision = write_pythia_revision(tmp_path / f"pythia-70m-step{BRANCH}", weights_file, config)
    (run,) = run_distributed(_branch, 1, branch_overrides(corpus, tmp_path / "run", revision))
    batch = read_samples(corpus["prefix"])[BRANCH * GBS : (BRANCH + 1) * GBS]
    first = global_batches([run], GBS // MICRO)[0]
    np.testing.assert_array_equal(first, batch)  # the branch's first step trains on global batch N

    tanh = transformers_loss(revision, batch, "gelu_pytorch_tanh")
    exact = transformers_loss(revision, batch, "gelu")
    assert abs(tanh - exact) > 1e-4 * tanh  # the test can tell the two activations apart
    branched = logged_metrics(tmp_path / "run")[BRANCH + 1]["train/loss"]
    assert branched == pytest.approx(tanh, rel=2e-6)
    # Pythia's lr at n = N updates (AnnealingLR of gpt-neox d36f623: lr * n / w in the warm-up)
    assert run["lrs"][0] == pytest.approx(1e-3 * BRANCH / 1430, rel=1e-12)


def test_the_activation_label_on_import_and_export(tmp_path):
    """How the label is read: gelu (Pythia's label) passes a tanh run config, with a note; an explicit label that
    contradicts the config, or one that is no GELU, is refused in one line. Export writes gelu_pytorch_tanh."""
    from l2e_dist.checkpoint.compat import architecture_mismatch, pythia_gelu_note
    from l2e_dist.checkpoint.convert import WeightSource, import_hf
    from l2e_dist.checkpoint.hf import hf_config_dict
    from l2e_dist.model.config import ModelConfig

    def source(label: str) -> WeightSource:
        directory = tmp_path / label
        (directory).mkdir()
        (directory / "config.json").write_text(json.dumps({**PUBLISHED_CONFIG, "hidden_act": label}))
        torch.save({}, directory / "pytorch_model.bin")  # the label is what is read here
        return WeightSource(directory)

    run = dict(num_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128)
    tanh, exact = ModelConfig(**run, gelu_approximate="tanh"), ModelConfig(**run, gelu_approximate="none")
    pythia = source("gelu")
    assert pythia.pythia_gelu_label and pythia.model_config.gelu_approximate == "none"
    assert architecture_mismatch(pythia.model_config, tanh, pythia.pythia_gelu_label) == ""
    assert architecture_mismatch(pythia.model_config, exact, pythia.pythia_gelu_label) == ""
    note = pythia_gelu_note(pythia.model_config, tanh, True, "rev")
    assert "Pythia's label" in note and "\n" not in note
    assert pythia_gelu_note(pythia.model_config, exact, True, "rev") == ""
    explicit = source("gelu_pytorch_tanh")
    assert not explicit.pythia_gelu_label
    assert architecture_mismatch(explicit.model_config, exact, explicit.pythia_gelu_label) == (
        "model.gelu_approximate: checkpoint 'tanh', config 'none'")
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act 'relu' is not a GELU") as err:
        source("relu")
    assert "\n" not in str(err.value)
    # import_hf keeps the label, so init_from of its output reads it the same way
    revision = write_pythia_revision(tmp_path / "rev", "model.safetensors", PUBLISHED_CONFIG)
    imported = WeightSource(import_hf(revision, tmp_path / "imported", tp=1))
    assert imported.pythia_gelu_label
    assert architecture_mismatch(imported.model_config, tanh, imported.pythia_gelu_label) == ""
    # export: what transformers computes is what the run trained
    assert hf_config_dict(tanh, 50304)["hidden_act"] == "gelu_pytorch_tanh"
    assert hf_config_dict(exact, 50304)["hidden_act"] == "gelu"
    assert math.isclose(hf_config_dict(tanh, 50304)["rotary_pct"], 0.25)
