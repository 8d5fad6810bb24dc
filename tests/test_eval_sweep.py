"""l2e-eval across training, offline on the bundled local task: a tiny run's snapshots (converted on the fly),
an HF revisions folder (its `l2e-convert to-hf --all` export, as a local mirror of Pythia's revisions would be)
and a single HF directory, evaluated with --steps, comma-separated --tasks and lm-eval's flag spellings. The
per-step tables hold exactly the asked steps and tasks, the run and its export score the same at every step,
one step's score equals lm-eval run directly (its own CLI) on that exported model, the PNGs are real PNGs whose
figures have one line per input, and a second sweep reuses every table."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.tiny_snapshot_run import train_snapshot_run

TASK_DIR = ROOT / "tests" / "data" / "lm_eval_tasks"
STEPS = [4, 8]

pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e .[eval]")


def _offline_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _second_task(directory: Path) -> Path:
    """A second local task on the same questions with another prompt (so the two tasks score independently)."""
    directory.mkdir()
    for name in ("tiny_mc.jsonl", "tiny_mc_data.py"):
        shutil.copy2(TASK_DIR / name, directory / name)
    text = (TASK_DIR / "l2e_tiny_mc.yaml").read_text()
    text = text.replace("task: l2e_tiny_mc", "task: l2e_tiny_mc_qa").replace('"Question: {{question}}\\nAnswer:"',
                                                                           '"Q: {{question}}\\nA:"')
    assert "l2e_tiny_mc_qa" in text and "Q: {{question}}" in text
    (directory / "l2e_tiny_mc_qa.yaml").write_text(text)
    return directory / "l2e_tiny_mc_qa.yaml"


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    """Per document (by id), the log-likelihood of each choice as the harness logged it."""
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def _eval(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "launcher.eval", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_eval_across_steps_runs_exports_and_revisions(tmp_path, data_cache):
    from matplotlib.image import imread

    from l2e_dist.analysis.eval_sweep import task_figure
    from launcher.convert import main as convert_main

    run = train_snapshot_run(tmp_path / "l2e-run", data_cache)
    revisions = tmp_path / "revisions"
    assert convert_main(["to-hf", str(run), str(revisions), "--all"]) == 0
    single = revisions / "step4"
    env, out = _offline_env(tmp_path), tmp_path / "eval"
    tasks = f"{TASK_DIR / 'l2e_tiny_mc.yaml'},{_second_task(tmp_path / 'tasks')}"
    args = [str(run), str(revisions), str(single), "--label", "l2e", "--label", "pythia", "--label", "final",
            "--tasks", tasks, "--steps", ",".join(map(str, STEPS)), "--num_fewshot", "0", "--batch_size", "4",
            "--output_path", str(out), "--limit", "12", "--device", "cpu", "--log_samples"]
    first = _eval(args, env)

    expected = {(label, step, task) for label in ("l2e", "pythia") for step in STEPS
                for task in ("l2e_tiny_mc", "l2e_tiny_mc_qa")}
    expected |= {("final", 4, task) for task in ("l2e_tiny_mc", "l2e_tiny_mc_qa")}  # a single dir: its name's step
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["run", "step", "task", "metric", "value", "stderr"]
    assert {(r["run"], int(r["step"]), r["task"]) for r in rows} == expected  # step 0 was not asked for
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and all(r["stderr"] for r in rows)
    for label, step in [("l2e", 4), ("l2e", 8), ("pythia", 4), ("pythia", 8), ("final", 4)]:
        table = json.loads((out / label / f"step{step}.json").read_text())
        assert {(r["run"], r["step"]) for r in table["rows"]} == {(label, step)}
        assert table["n-samples"]["l2e_tiny_mc"]["effective"] == 12
        with open(out / label / f"step{step}.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == len(table["rows"]) == 4  # 2 tasks x (acc, acc_norm)
    assert not (out / "l2e" / "step0.json").exists()
    scores = {(r["run"], int(r["step"]), r["task"], r["metric"]): float(r["value"]) for r in rows}
    for (label, step, task, metric), value in scores.items():
        if label == "l2e":  # snapshot converted on the fly == the exported revision, bit for bit
            assert value == scores[("pythia", step, task, metric)], (step, task, metric)
    assert len(list((out / "hf-cache" / "l2e").iterdir())) == len(STEPS)  # one conversion per step

    direct = tmp_path / "direct"  # lm-eval's own CLI on the exported step-8 model
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
         f"pretrained={revisions / 'step8'},dtype=float32", "--tasks", "l2e_tiny_mc", "--include_path",
         str(TASK_DIR), "--num_fewshot", "0", "--batch_size", "4", "--device", "cpu", "--output_path", str(direct),
         "--log_samples"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (result_file,) = direct.rglob("results_*.json")
    harness = json.loads(result_file.read_text())["results"]["l2e_tiny_mc"]
    for metric in ("acc", "acc_norm"):
        assert scores[("l2e", 8, "l2e_tiny_mc", metric)] == harness[f"{metric},none"], metric
    # accuracies over 12 questions are coarse: the per-choice log-likelihoods are the same numbers too
    (samples_file,) = direct.rglob("samples_l2e_tiny_mc_*.jsonl")
    direct_ll = _loglikelihoods([json.loads(line) for line in samples_file.read_text().splitlines()])
    ours = {(label, step): _loglikelihoods(json.loads((out / label / f"step{step}.json").read_text())["samples"][
        "l2e_tiny_mc"]) for label, step in [("l2e", 4), ("l2e", 8), ("pythia", 8)]}
    assert ours[("l2e", 8)] == direct_ll == ours[("pythia", 8)]
    assert ours[("l2e", 4)] != ours[("l2e", 8)]  # the steps are different models: the check can fail

    for task in ("l2e_tiny_mc", "l2e_tiny_mc_qa"):
        png = out / "plots" / f"{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png).ndim == 3
        plotted = json.loads(png.with_suffix(".json").read_text())["metrics"]
        assert set(plotted) == {"acc", "acc_norm"}
        for metric, series in plotted.items():
            assert set(series) == {"l2e", "pythia", "final"}
            assert series["l2e"]["steps"] == STEPS and series["final"]["steps"] == [4]
            assert series["l2e"]["values"] == [scores[("l2e", s, task, metric)] for s in STEPS]
        all_rows = json.loads((out / "results.json").read_text())["rows"]
        figure = task_figure(all_rows, task)
        for ax in figure.axes:
            assert sorted(line.get_label() for line in ax.lines) == ["final", "l2e", "pythia"]
            assert [list(line.get_xdata()) for line in ax.lines if line.get_label() == "l2e"] == [STEPS]

    from l2e_dist.analysis.eval_sweep import discover

    assert [(m.label, m.step, m.is_hf) for m in discover(run)] == [("l2e-run", s, False) for s in (0, 4, 8)]
    shutil.copytree(run / "checkpoints", tmp_path / "no-snapshots" / "checkpoints")
    (latest,) = discover(tmp_path / "no-snapshots")  # a run without snapshots: its latest checkpoint
    assert (latest.label, latest.step, latest.is_hf, latest.path.name) == ("no-snapshots", 8, False, "global_step8")

    second = _eval(args, env)  # same settings, same weights: nothing is evaluated again
    assert second.stdout.count("reused") == 5 and "converted" not in second.stdout
    assert "converted" in first.stdout
    with open(out / "results.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows


def test_eval_input_errors_are_one_line(tmp_path, capsys):
    from launcher.eval import main

    step, namesake = tmp_path / "revisions" / "step4", tmp_path / "other" / "revisions" / "step4"
    for directory in (step, namesake):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
        (directory / "tokenizer.json").write_text("{}")
    cases = [
        ([str(tmp_path / "missing"), "--tasks", "x"], "does not exist"),
        ([str(tmp_path / "revisions"), "--tasks", "x", "--steps", "4,8"], "has no step(s) [8]: its steps are [4]"),
        ([str(tmp_path / "revisions"), "--tasks", "x", "--label", "a", "--label", "b"], "one --label per input"),
        ([str(tmp_path / "revisions"), str(namesake.parent), "--tasks", "x"], "give each input its own --label"),
        ([str(tmp_path / "revisions"), str(step), "--label", "a", "--label", "b", "--tasks", "x", "--out",
          str(tmp_path / "one.json")], "takes one model, the inputs hold 2"),
    ]
    for argv, phrase in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and phrase in err, (argv, err)
    with pytest.raises(SystemExit):
        main([str(step), "--tasks", "x", "--steps", "4,a"])
    assert "comma-separated step numbers" in capsys.readouterr().err


def test_comma_separated_tasks_are_split():
    from l2e_dist.analysis.evaluate import resolve_tasks

    names, include = resolve_tasks([f"{TASK_DIR / 'l2e_tiny_mc.yaml'},piqa", "arc_easy"])
    assert names == ["l2e_tiny_mc", "piqa", "arc_easy"] and include == [str(TASK_DIR.resolve())]
