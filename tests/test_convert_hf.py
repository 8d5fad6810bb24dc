"""HF export and import: `export_hf` of a TP=2 x ZeRO-1 and of a ZeRO-3 (DP=2) training checkpoint loads with
`AutoModelForCausalLM.from_pretrained` alone and gives the logits of our model as trained (1e-4); the reference
logits come from weights read independently of our reader: DeepSpeed's own per-TP-rank module files, and
DeepSpeed's zero_to_fp32 for ZeRO-3. The exported tokenizer encodes like the run's SentencePiece model.
HF -> ours (TP=2) -> HF reproduces every tensor exactly, and `train.init_from`'s loader puts those weights
into a TP=2 model that matches transformers' logits. End to end, a run started with `train.init_from` on an
imported checkpoint logs as its first loss transformers' loss of the exported model on that global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.checkpoint_runs import LAYOUTS, STEPS, reference_run
from tests.conftest import ROOT, pretrain_losses, small_run_overrides
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # every test reads a 2-rank reference run (torchrun)

TOKENS = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(7))
TAG = f"global_step{STEPS}"


def _gather_tp(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _our_logits(tp2_ckpt: str, zero3_run: str, imported: str, hf_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """On 2 ranks: our model's logits for the three weight sources (see module docstring)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from megatron.core import parallel_state

    from l2e_dist.checkpoint.convert import load_init_weights
    from l2e_dist.checkpoint.ds_files import safe_load
    from l2e_dist.config_utils import build
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    dist.init_process_group("gloo")
    layout = init_process_groups(2)
    out = {}
    with torch.no_grad():
        states = safe_load(Path(tp2_ckpt) / f"mp_rank_{layout.tp_rank:02d}_model_states.pt")
        model = GPTNeoX(build(ModelConfig, states["config"]["model"], "model")).eval()
        model.load_state_dict(states["module"])  # this TP rank's weights as DeepSpeed saved them
        out["tp2_zero1"] = _gather_tp(model(TOKENS))
        imported_cfg = build(ModelConfig, safe_load(Path(imported) / "mp_rank_00_model_states.pt")["config"]["model"])
        model = GPTNeoX(imported_cfg).eval()
        load_init_weights(model, imported, layout.tp_rank, layout.tp_size)
        out["imported"] = _gather_tp(model(hf_tokens))
        parallel_state.destroy_model_parallel()
        init_process_groups(1)
        states = safe_load(Path(zero3_run) / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        model = GPTNeoX(build(ModelConfig, states["config"]["model"], "model")).eval()
        full = get_fp32_state_dict_from_zero_checkpoint(str(Path(zero3_run) / "checkpoints"), tag=TAG)
        model.load_state_dict(full, strict=False)
        assert set(model.state_dict()) - set(full) <= {k for k in model.state_dict() if k.endswith("_extra_state")}
        out["dp2_zero3"] = model(TOKENS)
    destroy_process_groups()
    return out


def _random_hf_model(directory: Path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
        rotary_pct=0.5, rotary_emb_base=5000, use_parallel_residual=False, hidden_act="gelu",
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=3, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(3)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # no zero biases or unit LayerNorms: every tensor is distinctive
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory, data_cache) -> dict:
    from l2e_dist.checkpoint.convert import export_hf, import_hf

    base = tmp_path_factory.getbasetemp()
    runs = {layout: reference_run(layout, base, data_cache) for layout in LAYOUTS}
    work = tmp_path_factory.mktemp("convert")
    hf_model = _random_hf_model(work / "hf")
    import_hf(work / "hf", work / "imported-tp2", tp=2)
    hf_tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(5))
    ours = run_distributed(
        _our_logits, 2, str(runs["tp2_zero1"] / "checkpoints" / TAG), str(runs["dp2_zero3"]),
        str(work / "imported-tp2"), hf_tokens,
    )[0]  # fmt: skip
    exports = {layout: export_hf(run, work / f"export-{layout}") for layout, run in runs.items()}
    exports["round_trip"] = export_hf(work / "imported-tp2", work / "round-trip")
    with torch.no_grad():
        hf_logits = hf_model(hf_tokens).logits
    return {"runs": runs, "work": work, "ours": ours, "exports": exports, "hf_logits": hf_logits}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_loads_in_transformers_with_our_logits(layout, converted):
    from transformers import AutoModelForCausalLM

    out = converted["exports"][layout]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(TOKENS).logits
    ours = converted["ours"][layout]
    assert logits.shape == ours.shape == (2, 24, 3072)
    assert (logits - ours).abs().max().item() < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert (config["rotary_pct"], config["use_parallel_residual"], config["hidden_act"], config["vocab_size"]) == (
        0.25, True, "gelu_pytorch_tanh", 3072,
    )


def test_exported_tokenizer_encodes_like_the_training_tokenizer(converted, data_cache):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from l2e_dist.data import prepare_default_corpus

    sp = spm.SentencePieceProcessor(model_file=str(Path(prepare_default_corpus(data_cache)).parent / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(converted["exports"]["tp2_zero1"])
    texts = [
        "Return the number of items in a container.\n\n  Raises ValueError on 0x1F.",
        "héllo  wörld\t日本語 🎉 1234567890 __init__(self, *args, **kwargs)",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == sp.eos_id()
    assert json.loads((converted["exports"]["tp2_zero1"] / "config.json").read_text())["eos_token_id"] == sp.eos_id()


def test_load_as_hf_state_dict_matches_the_export(converted):
    from safetensors.torch import load_file

    from l2e_dist.checkpoint.convert import load_as_hf_state_dict

    state, config = load_as_hf_state_dict(converted["runs"]["dp2_zero3"])  # a run dir: its latest checkpoint
    exported = load_file(str(converted["exports"]["dp2_zero3"] / "model.safetensors"))
    assert set(state) == set(exported)
    assert all(torch.equal(state[k], exported[k]) for k in state)
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 3072


def test_hf_to_ours_tp2_to_hf_round_trip_is_exact(converted):
    from safetensors.torch import load_file

    from l2e_dist.checkpoint.hf import from_hf_state_dict

    original = from_hf_state_dict(load_file(str(converted["work"] / "hf" / "model.safetensors")))
    back = from_hf_state_dict(load_file(str(converted["exports"]["round_trip"] / "model.safetensors")))
    assert set(original) == set(back)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    before = json.loads((converted["work"] / "hf" / "config.json").read_text())
    after = json.loads((converted["exports"]["round_trip"] / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "use_parallel_residual", "hidden_act", "rope_parameters", "eos_token_id", "layer_norm_eps"):
        assert after[key] == before[key], key


def test_init_from_weights_give_transformers_logits(converted):
    diff = (converted["ours"]["imported"] - converted["hf_logits"]).abs().max().item()
    assert diff < 1e-4


def test_training_starts_from_an_imported_checkpoint(converted, tmp_path, data_cache):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from l2e_dist.checkpoint.convert import import_hf
    from l2e_dist.config import load_config
    from l2e_dist.data import build_datasets, global_batch_iterator

    hf_dir = converted["exports"]["tp2_zero1"]  # the TP=2 run's final weights, as an HF directory
    imported = import_hf(hf_dir, tmp_path / "imported-tp2", tp=2)
    overrides = small_run_overrides(tmp_path / "run", data_cache, **{"train.train_iters": 1, "train.init_from": imported})
    first_loss = run_distributed(pretrain_losses, 1, overrides)[0][0]  # logged before the first update

    cfg = load_config([str(ROOT / "configs" / "tiny.yaml")], overrides)
    train = build_datasets(cfg.data, cfg.train.seq_length, cfg.train.seed).train
    batch = next(global_batch_iterator(train, global_batch_size=cfg.train.global_batch_size,
                                       micro_batch_size=cfg.train.global_batch_size, dp_rank=0, dp_size=1,
                                       seed=cfg.train.seed))[0]["tokens"]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(hf_dir)(batch[:, :-1]).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert abs(first_loss - expected) < 1e-5 * expected
    assert first_loss < 8.0  # trained weights, not a fresh initialisation (~8.3)
