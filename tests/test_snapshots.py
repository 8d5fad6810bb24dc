"""Snapshots for training dynamics: a Pythia-like save schedule on real 2-process runs (ZeRO-3 x DP=2 and
TP=2 x ZeRO-1) keeps exactly the scheduled weights-only snapshots through a SIGKILL and a resume that falls
back over a damaged checkpoint (none lost, none duplicated, keep_last_n prunes only resume checkpoints); the
step-0 snapshot holds the initialization (a single-process model built as the trainer builds it); the last
snapshot holds the last checkpoint's weights; `l2e-convert to-hf RUN OUT --all` writes every snapshot as
OUT/step<N>, loadable by transformers with our model's logits, skipping complete exports and never leaving a
partial one; l2e-neuromfa and l2e-analyze take a run directory, NeuroMFA's E(t) is relative to step 0 (or
warns naming its t = 0); bad schedules are one-line config errors naming the key."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from l2e_dist.config import load_config
from launcher.pretrain import main as pretrain_main
from tests.checkpoint_runs import LAYOUTS, run_training
from tests.conftest import ROOT, small_run_overrides
from tests.distributed import run_distributed
from tests.test_checkpoint_resume import _kill_at_checkpoint, resumed_step

TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS, SAVE_INTERVAL, EXTRA = 12, 4, [3, 6, 7]
EXPECTED = [0, 1, 2, 3, 4, 6, 7, 8, 12]  # 0, powers of two below 4, extra steps, every 4th and the last
TOKENS = torch.randint(0, 3000, (2, 24), generator=torch.Generator().manual_seed(11))


# ------------------------------------------------------------------------------------------- config
def test_pythia_schedule_is_pythias_154_checkpoints():
    cfg = load_config([str(ROOT / "configs" / "pythia-410m.yaml")])
    expected = [0, *(2**k for k in range(10)), *range(1000, 143001, 1000)]
    assert cfg.train.snapshot_steps() == expected and len(expected) == 154
    cfg = load_config([TINY], [f"train.train_iters={STEPS}", f"train.save_interval={SAVE_INTERVAL}",
                               "train.save_schedule=pythia", f"train.extra_save_steps={EXTRA}"])
    assert cfg.train.snapshot_steps() == EXPECTED
    assert load_config([TINY]).train.snapshot_steps() == []  # default: no snapshots


@pytest.mark.parametrize(("overrides", "key", "phrase"), [
    (["train.extra_save_steps=[4, 2]"], "train.extra_save_steps", "strictly increasing, got 4 then 2"),
    (["train.extra_save_steps=[3, 3]"], "train.extra_save_steps", "strictly increasing"),
    (["train.extra_save_steps=[5, 300]"], "train.extra_save_steps", "step 300 is past train.train_iters=200"),
    (["train.extra_save_steps=[-1, 5]"], "train.extra_save_steps", ">= 0"),
    (["train.save_schedule=pythia", "train.save_interval=0"], "train.save_schedule", "train.save_interval > 0"),
    (["train.save_schedule=log"], "train.save_schedule", "must be one of"),
])  # fmt: skip
def test_bad_schedule_is_a_one_line_config_error(overrides, key, phrase, capsys):
    args = ["--config", TINY]
    for item in overrides:
        args += ["--set", item]
    assert pretrain_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err and phrase in err, err


# ------------------------------------------------------------------------------------------- runs
def _overrides(out: Path, data_cache: str, layout: str) -> list[str]:
    return small_run_overrides(out, data_cache, **LAYOUTS[layout], **{
        "train.train_iters": STEPS, "train.save_interval": SAVE_INTERVAL, "train.keep_last_n": 2,
        "train.save_schedule": "pythia", "train.extra_save_steps": EXTRA,
    })  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict:
    """ZeRO-3 x DP=2: SIGKILLed once checkpoint 8 exists, checkpoint 8 damaged, resumed (falls back to 4 and
    re-runs steps 5-12). TP=2 x ZeRO-1: uninterrupted."""
    base = tmp_path_factory.mktemp("snapshot-runs")
    killed = base / "dp2_zero3"
    overrides = _overrides(killed, data_cache, "dp2_zero3")
    _kill_at_checkpoint(overrides, killed / "checkpoints", 8)
    before = sorted(p.name for p in (killed / "snapshots").iterdir())
    shard = sorted((killed / "checkpoints" / "global_step8").glob("*optim_states.pt"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    resumed = run_training(overrides)
    tp2 = base / "tp2_zero1"
    run_training(_overrides(tp2, data_cache, "tp2_zero1"))
    return {"dp2_zero3": killed, "tp2_zero1": tp2, "before_kill": before, "resumed": resumed, "base": base}


@pytest.mark.slow
def test_snapshots_survive_sigkill_and_resume_exactly_once(runs):
    from l2e_dist.checkpoint.manifest import verify_checkpoint

    run = runs["dp2_zero3"]
    assert {f"step{s}" for s in EXPECTED if s <= 8} <= set(runs["before_kill"])
    proc = runs["resumed"]
    assert resumed_step(proc.stdout) == 4  # checkpoint 8 is damaged: the resume falls back to 4
    for step in (6, 7, 8):  # written by the killed attempt, kept (the resume re-ran these steps)
        assert f"snapshot {run / 'snapshots' / f'step{step}'} already exists (intact); kept" in proc.stdout
    for name in ("dp2_zero3", "tp2_zero1"):
        snapshots = sorted((runs[name] / "snapshots").iterdir(), key=lambda p: (len(p.name), p.name))
        assert [p.name for p in snapshots] == [f"step{s}" for s in EXPECTED], name  # no .tmp-* leftovers
        for path in snapshots:
            assert verify_checkpoint(path, deep=True) is None
            assert not list(path.glob("*optim_states.pt"))
        kept = sorted(p.name for p in (runs[name] / "checkpoints").iterdir() if p.is_dir())
        assert kept == ["global_step12", "global_step8"], name  # keep_last_n=2 pruned 4; snapshots untouched


def _init_weights(model_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """The trainer's initialization in one process at TP=1: seed_everything(seed), then GPTNeoX(config)."""
    from l2e_dist.config_utils import build
    from l2e_dist.model.config import ModelConfig
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups
    from l2e_dist.training.trainer import seed_everything

    init_process_groups(1)  # a world of one, in the test process
    seed_everything(seed)
    weights = {k: v.detach().clone() for k, v in GPTNeoX(build(ModelConfig, model_config, "model")).named_parameters()}
    destroy_process_groups()
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_step0_is_the_initialization_and_last_snapshot_the_last_checkpoint(layout, runs):
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint

    snapshots = runs[layout] / "snapshots"
    step0 = DeepSpeedCheckpoint(snapshots / "step0")
    assert step0.client_state["step"] == 0 and step0.tp_size == (2 if layout == "tp2_zero1" else 1)
    config = step0.client_state["config"]
    tp = 2 if layout == "tp2_zero1" else 1
    resolved = step0.client_state["resolved"]  # what the launch derived, next to the config that asked for it
    assert resolved["world_size"] == 2 and (resolved["tensor_parallel"], resolved["data_parallel"]) == (tp, 2 // tp)
    assert resolved["zero_stage"] == (0 if tp == 2 else 3)  # fp32 ZeRO-1 at DP=1 runs as stage 0
    assert resolved["vocab_size"] == config["model"]["vocab_size"]
    assert resolved["grad_accum_steps"] * config["train"]["micro_batch_size"] * (2 // tp) == config["train"][
        "global_batch_size"]
    reference = _init_weights(config["model"], config["train"]["seed"])
    assert sorted(step0.names) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(step0.full(name), tensor), name
    step1 = DeepSpeedCheckpoint(snapshots / "step1")
    assert not torch.equal(step1.full("embed_in.weight"), step0.full("embed_in.weight"))  # taken after step 1
    last, checkpoint = DeepSpeedCheckpoint(snapshots / f"step{STEPS}"), DeepSpeedCheckpoint(
        runs[layout] / "checkpoints" / f"global_step{STEPS}")
    for name in checkpoint.names:
        assert torch.equal(last.full(name), checkpoint.full(name)), name


@pytest.mark.slow
def test_a_run_that_does_not_resume_replaces_old_snapshots(tmp_path, data_cache):
    from l2e_dist.checkpoint.ds_files import DeepSpeedCheckpoint
    from tests.conftest import pretrain_result

    def run(seed: int) -> torch.Tensor:
        overrides = small_run_overrides(tmp_path, data_cache, **{
            "train.train_iters": 2, "train.extra_save_steps": [0, 2], "train.seed": seed, "train.resume": False})
        run_distributed(pretrain_result, 1, overrides)
        assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["step0", "step2"]
        return DeepSpeedCheckpoint(tmp_path / "snapshots" / "step0").full("embed_in.weight")

    first, second = run(seed=1), run(seed=2)
    assert not torch.equal(first, second)  # the second run's initialization, not the first's


# ------------------------------------------------------------------------------------------- export
def _our_logits(snapshots: list[str]) -> list[torch.Tensor]:
    """Our GPTNeoX (TP=1) forward with each snapshot's weights, loaded as train.init_from loads them."""
    from l2e_dist.checkpoint.convert import WeightSource, load_init_weights
    from l2e_dist.model.gpt_neox import GPTNeoX
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1)  # a world of one, in the test process
    out = []
    with torch.no_grad():
        for path in snapshots:
            model = GPTNeoX(WeightSource(path).model_config).eval()
            load_init_weights(model, path, 0, 1)
            out.append(model(TOKENS))
    destroy_process_groups()
    return out


@pytest.fixture(scope="module")
def exports(runs) -> dict[str, Path]:
    from launcher.convert import main as convert_main

    out = {}
    for layout in LAYOUTS:
        out[layout] = runs["base"] / f"hf-{layout}"
        assert convert_main(["to-hf", str(runs[layout]), str(out[layout]), "--all"]) == 0
    return out


@pytest.mark.slow
def test_all_exports_load_in_transformers_with_our_logits(runs, exports):
    from transformers import AutoModelForCausalLM

    for layout in LAYOUTS:
        assert sorted(p.name for p in exports[layout].iterdir()) == sorted(f"step{s}" for s in EXPECTED)
        snapshots = [str(runs[layout] / "snapshots" / f"step{s}") for s in EXPECTED]
        ours = _our_logits(snapshots)
        for step, our_logits in zip(EXPECTED, ours):
            model = AutoModelForCausalLM.from_pretrained(exports[layout] / f"step{step}").eval()
            with torch.no_grad():
                logits = model(TOKENS).logits
            assert logits.shape == our_logits.shape
            assert (logits - our_logits).abs().max().item() < 1e-4, (layout, step)
            assert (exports[layout] / f"step{step}" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_all_export_skips_complete_ones_and_a_killed_export_leaves_nothing(runs, exports, tmp_path, capsys,
                                                                           monkeypatch):
    import safetensors.torch

    from launcher.convert import main as convert_main

    run, out = runs["dp2_zero3"], tmp_path / "hf"
    shutil.copytree(exports["dp2_zero3"], out)
    capsys.readouterr()
    assert convert_main(["to-hf", str(run), str(out), "--all"]) == 0
    assert f"0 snapshots exported, {len(EXPECTED)} already in" in capsys.readouterr().out

    shutil.rmtree(out / "step4")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / f".step4.tmp-{dead.pid}"  # what a SIGKILLed exporter leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    real_save = safetensors.torch.save_file

    def dies_while_writing(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupted export
    monkeypatch.setattr(safetensors.torch, "save_file", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        convert_main(["to-hf", str(run), str(out), "--all"])
    assert not (out / "step4").exists() and not stale.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert convert_main(["to-hf", str(run), str(out), "--all"]) == 0
    assert f"1 snapshots exported, {len(EXPECTED) - 1} already in" in capsys.readouterr().out
    assert (out / "step4" / "model.safetensors").is_file()

    damaged_run = tmp_path / "damaged"
    shutil.copytree(run / "snapshots", damaged_run / "snapshots")
    weights = damaged_run / "snapshots" / "step2" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    weights.write_bytes(bytes(data))
    assert convert_main(["to-hf", str(damaged_run), str(tmp_path / "hf2"), "--all"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step2" in err and "sha256" in err, err
    assert sorted(p.name for p in (tmp_path / "hf2").iterdir()) == sorted(f"step{s}" for s in EXPECTED if s != 2)
    assert convert_main(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "hf3"), "--all"]) == 2
    assert "has no snapshots" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- analysis
@pytest.mark.slow
def test_neuromfa_takes_a_run_directory_and_measures_from_step0(runs, exports, tmp_path, caplog):
    from launcher.neuromfa import main as neuromfa_main

    settings = ["--samples", "2"]
    with caplog.at_level(logging.INFO):
        assert neuromfa_main([str(runs["dp2_zero3"]), "--out", str(tmp_path / "a"), *settings]) == 0
    assert "E(t) relative to step 0, the initialization" in caplog.text
    run = json.loads((tmp_path / "a" / "neuromfa.json").read_text())["runs"][0]
    assert [c["step"] for c in run["checkpoints"]] == EXPECTED
    assert run["emergence_reference"]["step"] == 0 and run["emergence_reference"]["initialization"]
    assert run["checkpoints"][0]["emergence"] == 0.0 and run["checkpoints"][-1]["emergence"] != 0.0

    hf = exports["dp2_zero3"]  # two steps of an --all export: its step0 is found next to them
    assert neuromfa_main([str(hf / "step8"), str(hf / "step4"), "--out", str(tmp_path / "b"), *settings]) == 0
    run_b = json.loads((tmp_path / "b" / "neuromfa.json").read_text())["runs"][0]
    assert [c["step"] for c in run_b["checkpoints"]] == [0, 4, 8]
    by_step = {c["step"]: c for c in run["checkpoints"]}
    for c in run_b["checkpoints"]:  # HF export and snapshot give the same spectra
        assert c["alpha_0"] == pytest.approx(by_step[c["step"]]["alpha_0"], rel=1e-6)

    lone = tmp_path / "lone"
    for step in (4, 8):
        shutil.copytree(hf / f"step{step}", lone / f"step{step}")
    with pytest.warns(RuntimeWarning, match=r"no step-0 snapshot: E\(t\) is measured relative to step 4"):
        assert neuromfa_main([str(lone), "--out", str(tmp_path / "c"), *settings]) == 0
    run_c = json.loads((tmp_path / "c" / "neuromfa.json").read_text())["runs"][0]
    assert run_c["emergence_reference"] == {"step": 4, "path": str(lone / "step4"), "initialization": False}


@pytest.mark.slow
def test_analyze_takes_a_run_directory_in_step_order(runs, exports, tmp_path, data_cache):
    from l2e_dist.data import prepare_default_corpus
    from launcher.analyze import main as analyze_main

    prefix = prepare_default_corpus(data_cache)
    argv = [str(runs["tp2_zero1"]), str(exports["dp2_zero3"]), "--labels", "tp2", "z3", "--data", str(prefix),
            "--seq-length", "16", "--max-tokens", "64", "--layers", "1", "--out", str(tmp_path / "analysis"),
            "--no-progress", "--device", "cpu"]
    assert analyze_main(argv) == 0
    report = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    labels = [m["label"] for m in report["models"]]
    assert labels == [f"tp2/step{s}" for s in EXPECTED] + [f"z3/step{s}" for s in EXPECTED]
    scores = {m["label"]: m["layers"][0]["score"]["mean"] for m in report["models"]}
    assert scores["tp2/step0"] != scores["tp2/step12"]
