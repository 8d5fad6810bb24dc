"""Run identity through the real CLI: a resume with another experiment is refused in one line naming the keys and
the fix, a finished run started again trains nothing, layout changes and a longer run on the same schedule
resume, and a baseline and its L2E run land in different default directories. The run directory is hashed
before and after every refused or finished launch: byte-identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from l2e_dist.checkpoint.identity import KEY_RULES, RunIdentityError, check_same_experiment, config_keys
from l2e_dist.config import config_to_dict, load_config
from tests.checkpoint_runs import tree_digest
from tests.conftest import ROOT, small_run_overrides

STEPS = 4
TINY = str(ROOT / "configs" / "tiny.yaml")


def pretrain_cli(overrides: list[str], *configs: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    sets = [arg for item in overrides for arg in ("--set", item)]
    config_args = [arg for path in (configs or (TINY,)) for arg in ("--config", path)]
    return subprocess.run(
        [sys.executable, "-m", "launcher.pretrain", *config_args, *sets], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}, timeout=600,
    )  # fmt: skip


def run_overrides(out: Path, data_cache: str, **extra: object) -> list[str]:
    return small_run_overrides(out, data_cache, **{
        "train.train_iters": STEPS, "train.save_interval": 2, "train.keep_last_n": 0, "l2e.method": "l2e",
        "l2e.forget_steps": 1, **extra})  # fmt: skip


# ------------------------------------------------------------------------------------------------ the table
def test_every_config_key_is_classified():
    keys = config_keys()
    assert "optimizer.lr" in keys and "deepspeed.extra" in keys and "l2e.reg_lambda" in keys
    missing = sorted(set(keys) - set(KEY_RULES))
    assert not missing, f"classify these keys in l2e_dist/checkpoint/identity.py KEY_RULES: {missing}"
    assert not sorted(set(KEY_RULES) - set(keys)), "KEY_RULES names keys the config no longer has"


def _tiny(*overrides: str):
    cfg = load_config([TINY], ["train.output_dir=runs/x", *overrides])
    cfg.model.vocab_size = 3000  # as the trainer resolves it
    return cfg


def test_layout_keys_may_change_experiment_keys_may_not():
    saved = config_to_dict(_tiny())
    check_same_experiment(saved, _tiny(
        "parallel.tensor_parallel=2", "deepspeed.zero_stage=2", "train.micro_batch_size=2",
        "train.activation_checkpointing=true", "train.log_interval=1", "train.output_dir=elsewhere",
        "parallel.watchdog_timeout_s=10", "parallel.dist_timeout_s=100", "train.compile=true",
        "logging.tensorboard=false", "model.loss_chunk_tokens=64", "train.train_iters=300",
        "optimizer.lr_decay_iters=200", "model.intermediate_size=512"), "run")  # 512 = 4 x 128: the same
    for change, shown in [
        ("train.seed=7", "train.seed: 1234 -> 7"),
        ("l2e.method=memel", "l2e.method: 'l2e' -> 'memel'"),
        ("optimizer.betas=[0.9,0.99]", "optimizer.betas: [0.9, 0.95] -> [0.9, 0.99]"),
        ("deepspeed.precision=bf16", "deepspeed.precision: 'fp32' -> 'bf16'"),
        ("data.split=1,1,1", "data.split: '969,30,1' -> '1,1,1'"),
        ("train.global_batch_size=32", "train.global_batch_size: 16 -> 32"),
    ]:
        with pytest.raises(RunIdentityError, match=f"run holds another experiment \\({_escaped(shown)}\\): "
                                                   "resume with the same config, or .*train.output_dir"):
            check_same_experiment(saved, _tiny(change), "run")


def _escaped(text: str) -> str:
    return "".join("\\" + c if c in "()[].*+?" else c for c in text)


def test_the_schedule_length_is_compared_not_train_iters():
    saved = config_to_dict(_tiny())  # lr_decay_iters null: the schedule is train_iters = 200 long
    with pytest.raises(RunIdentityError, match=r"optimizer.lr_decay_iters: 200 -> 400\) \(to train longer on the "
                                               r"same schedule, set optimizer.lr_decay_iters=200\)"):
        check_same_experiment(saved, _tiny("train.train_iters=400"), "run")
    check_same_experiment(saved, _tiny("train.train_iters=400", "optimizer.lr_decay_iters=200"), "run")


def test_l2e_settings_of_a_baseline_and_fp16_scaling_of_fp32_are_not_compared():
    saved = config_to_dict(_tiny("l2e.method=none"))
    check_same_experiment(saved, _tiny("l2e.method=none", "l2e.reg_lambda=1e-3", "deepspeed.loss_scale_window=5"),
                          "run")
    with pytest.raises(RunIdentityError, match="l2e.reg_lambda"):
        check_same_experiment(config_to_dict(_tiny()), _tiny("l2e.reg_lambda=1e-3"), "run")


def test_many_differences_are_counted_after_the_first_few():
    saved = config_to_dict(_tiny())
    changes = ["train.seed=1", "optimizer.lr=0.1", "optimizer.eps=1e-3", "optimizer.weight_decay=0.2",
               "optimizer.grad_clip=0.5", "l2e.reg_lambda=1e-3"]
    with pytest.raises(RunIdentityError, match=r"; and 2 more\)") as info:
        check_same_experiment(saved, _tiny(*changes), "run")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(("configs", "expected"), [
    (["pythia-160m.yaml"], "runs/pythia-160m"),
    (["pythia-160m.yaml", "l2e/l2e.yaml"], "runs/pythia-160m-l2e"),
    (["pythia-160m-deduped.yaml", "l2e/memel.yaml"], "runs/pythia-160m-deduped-memel"),
    (["tiny.yaml"], "runs/tiny-l2e"),
    (["tiny.yaml", "l2e/none.yaml"], "runs/tiny"),
])
def test_default_output_dirs_of_a_baseline_and_its_l2e_run_differ(configs, expected):
    assert load_config([str(ROOT / "configs" / c) for c in configs]).train.output_dir == expected


def test_an_explicit_output_dir_is_kept():
    assert load_config([TINY], ["train.output_dir=somewhere"]).train.output_dir == "somewhere"


# ------------------------------------------------------------------------------------------- the real CLI
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("identity") / "run"
    proc = pretrain_cli(run_overrides(out, data_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["output_dir"] == str(out) and saved["model"]["vocab_size"] is not None  # resolved
    assert load_config([str(out / "config.yaml")]).train.seed == 1234  # config.yaml is a config file
    return out


@pytest.mark.slow
def test_a_finished_run_started_again_trains_nothing(finished_run, data_cache):
    before = tree_digest(finished_run)
    proc = pretrain_cli(run_overrides(finished_run, data_cache, **{"train.micro_batch_size": 4}))  # layout: free
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"already complete at step {STEPS} ({finished_run / 'checkpoints' / f'global_step{STEPS}'})" in proc.stdout
    assert "final loss" not in proc.stdout and "resumed from" not in proc.stdout
    assert tree_digest(finished_run) == before


@pytest.mark.slow
def test_another_experiment_is_refused_in_one_line(finished_run, data_cache):
    before = tree_digest(finished_run)
    proc = pretrain_cli(run_overrides(finished_run, data_cache, **{"train.seed": 7, "l2e.method": "memel"}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [
        f"l2e-pretrain: error: {finished_run / 'config.yaml'} holds another experiment (train.seed: 1234 -> 7; "
        "l2e.method: 'l2e' -> 'memel'): resume with the same config, or start a new run with another "
        "train.output_dir (and train.init_from=<its checkpoint> to start from its weights)"], proc.stderr[-3000:]
    assert tree_digest(finished_run) == before
    # A run directory from before config.yaml: its checkpoint's config decides.
    (finished_run / "config.yaml").rename(finished_run / "config.yaml.kept")
    try:
        proc = pretrain_cli(run_overrides(finished_run, data_cache, **{"optimizer.lr": 0.1}))
    finally:
        (finished_run / "config.yaml.kept").rename(finished_run / "config.yaml")
    assert proc.returncode == 2
    assert f"{finished_run / 'checkpoints' / f'global_step{STEPS}'} holds another experiment (optimizer.lr: " \
           "0.002 -> 0.1)" in proc.stderr, proc.stderr[-3000:]
    assert tree_digest(finished_run) == before


@pytest.mark.slow
def test_a_longer_run_on_the_same_schedule_and_another_layout_resumes(finished_run, data_cache, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    (run / "config.yaml").write_text((finished_run / "config.yaml").read_text().replace(str(finished_run), str(run)))
    longer = {"train.train_iters": STEPS + 2, "train.micro_batch_size": 4}
    proc = pretrain_cli(run_overrides(run, data_cache, **longer))
    assert proc.returncode == 2 and f"set optimizer.lr_decay_iters={STEPS}" in proc.stderr, proc.stderr[-3000:]
    proc = pretrain_cli(run_overrides(run, data_cache, **longer, **{"optimizer.lr_decay_iters": STEPS}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'global_step{STEPS}'} (step {STEPS}" in proc.stdout
    assert f"final step {STEPS + 2}" in proc.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["train_iters"] == STEPS + 2


@pytest.mark.slow
def test_default_directories_of_a_baseline_and_an_l2e_run_through_the_cli(tmp_path, data_cache):
    def overrides(method: str) -> list[str]:
        chosen = small_run_overrides("unused", data_cache, **{"train.train_iters": 2, "l2e.method": method, "l2e.forget_steps": 1})
        return [item for item in chosen if not item.startswith("train.output_dir=")]

    for method in ("none", "l2e"):
        proc = pretrain_cli(overrides(method), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny", "tiny-l2e"]
    for name, method in (("tiny", "none"), ("tiny-l2e", "l2e")):
        assert yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())["l2e"]["method"] == method


@pytest.mark.slow
def test_a_change_declared_in_config_yaml_resumes(finished_run, data_cache, tmp_path):
    """config.yaml is the identity later launches are held to: editing a key there declares a deliberate change
    (e.g. data moved), and the resume then accepts it although the checkpoint recorded the old value."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished_run), str(run)], check=True)
    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    saved["train"]["output_dir"] = str(run)
    saved["optimizer"]["grad_clip"] = 0.2
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    extra = {"optimizer.grad_clip": 0.2, "train.train_iters": STEPS + 1, "optimizer.lr_decay_iters": STEPS}
    proc = pretrain_cli(run_overrides(run, data_cache, **extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'global_step{STEPS}'} (step {STEPS}" in proc.stdout
