"""Every error a user can cause ends in ONE line naming the problem and the fix, exit code 2, printed once, and
leaves every existing file as it was: bad configs, data, tokenizers, checkpoints and arguments through each
command-line entry point, the same under torchrun, the deepspeed launcher, mpirun and srun with 2 ranks, a
data shard deleted while training, and a disk that fills up before a checkpoint (a real, tiny tmpfs).

In-process cases call each entry point's `main` (what its console script calls); the multi-process ones run
the real launchers. `--debug` / L2E_DEBUG=1 bring the traceback back.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, small_run_overrides

TINY = str(ROOT / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (what must be unchanged after a failed command)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def error_lines(text: str, prog: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{prog}: error:")]


def assert_one_line(text: str, prog: str, phrase: str) -> None:
    """One error line from us, containing `phrase`, and no traceback of ours (torchrun adds its own report
    of the failed children, ChildFailedError, which is not ours to change)."""
    lines = error_lines(text, prog)
    assert len(lines) == 1, text[-4000:]
    assert phrase in lines[0], lines[0]
    assert text.count("Traceback") == text.count("ChildFailedError:"), text[-4000:]
    assert not re.search(r"^\[rank\d+\]:", text, re.M), text[-4000:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_cache) -> dict[str, Path]:
    """A copy of the default corpus (intact, truncated .bin, garbage .idx), a small checkpoint with its config,
    an HF directory of another model type and a few other inputs."""
    from l2e_dist.data import prepare_default_corpus

    root = tmp_path_factory.mktemp("user-errors")
    source = Path(prepare_default_corpus(data_cache))
    paths: dict[str, Path] = {"root": root}
    for name in ("good", "truncated", "garbage"):
        (root / name).mkdir()
        for f in source.parent.glob(source.name + ".*"):
            shutil.copy(f, root / name / f.name)
        paths[name] = root / name / source.name
    with open(str(paths["truncated"]) + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(str(paths["truncated"]) + ".bin") - 10)
    Path(str(paths["garbage"]) + ".idx").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (root / "bad.yaml").write_text("train:\n  seq_length: 32\n  - oops\n")
    (root / "not-a-checkpoint").mkdir()
    (root / "not-a-checkpoint" / "notes.txt").write_text("hello")
    (root / "full-out").mkdir()
    (root / "full-out" / "keep.txt").write_text("existing output")
    (root / "docs.jsonl").write_text('{"text": "hello world"}\n')
    (root / "empty-run").mkdir()
    (root / "runs-broken").mkdir()
    (root / "runs-broken" / "metrics.jsonl").write_text("{not json\n")
    return paths


def _pretrain(ws, *overrides: str) -> list[str]:
    args = ["--config", TINY]
    for item in small_run_overrides(ws["root"] / "run", str(ws["root"] / "cache"), **{"train.train_iters": 2}):
        args += ["--set", item]
    for item in overrides:
        args += ["--set", item]
    return args


# (id, module, argv builder, phrase in the one error line)
CASES = [
    ("yaml-syntax", "pretrain", lambda ws: ["--config", str(ws["root"] / "bad.yaml")], "line 3"),
    ("config-missing", "pretrain", lambda ws: ["--config", str(ws["root"] / "nope.yaml")], "config file not found"),
    ("unknown-key", "pretrain", lambda ws: _pretrain(ws, "train.sed=1"), "train.sed"),
    ("bad-type", "pretrain", lambda ws: _pretrain(ws, "train.micro_batch_size=abc"), "expected an integer"),
    ("timeouts", "pretrain", lambda ws: _pretrain(ws, "parallel.dist_timeout_s=60"), "watchdog fires first"),
    ("data-missing", "pretrain", lambda ws: _pretrain(ws, f"data.paths=[{ws['root']}/nope]"), "nope.idx not found"),
    ("bin-truncated", "pretrain", lambda ws: _pretrain(ws, f"data.paths=[{ws['truncated']}]"), "truncated"),
    ("idx-garbage", "pretrain", lambda ws: _pretrain(ws, f"data.paths=[{ws['garbage']}]"), "bad header"),
    ("tokenizer-missing", "pretrain",
     lambda ws: _pretrain(ws, f"data.paths=[{ws['good']}]", f"data.tokenizer={ws['root']}/tok.json"), "tok.json"),
    ("vocab-too-small", "pretrain", lambda ws: _pretrain(ws, "model.vocab_size=8"), "model.vocab_size"),
    ("init-from-missing", "pretrain", lambda ws: _pretrain(ws, f"train.init_from={ws['root']}/nowhere"),
     "nowhere"),
    ("fkr-no-labels", "pretrain", lambda ws: _pretrain(ws, "l2e.method=l2e", "l2e.forget_steps=1", "l2e.fkr=true", "data.labels=false"),
     "l2e.fkr"),
    ("to-hf-not-checkpoint", "convert", lambda ws: ["to-hf", str(ws["root"] / "not-a-checkpoint"),
                                                    str(ws["root"] / "o1")], "is not a checkpoint"),
    ("to-hf-missing", "convert", lambda ws: ["to-hf", str(ws["root"] / "nowhere"), str(ws["root"] / "o2")],
     "does not exist"),
    ("from-hf-llama", "convert", lambda ws: ["from-hf", str(ws["root"] / "llama"), str(ws["root"] / "o3")],
     "'llama' model"),
    ("from-hf-no-config", "convert", lambda ws: ["from-hf", str(ws["root"] / "not-a-checkpoint"),
                                                 str(ws["root"] / "o4")], "no config.json"),
    ("from-hf-tp0", "convert", lambda ws: ["from-hf", str(ws["root"] / "llama"), str(ws["root"] / "o5"),
                                           "--tp", "0"], "--tp"),
    ("prepare-input-missing", "prepare_data",
     lambda ws: ["tokenize", "--input", str(ws["root"] / "nope.jsonl"), "--tokenizer", str(ws["root"] / "t.json"),
                 "--output-prefix", str(ws["root"] / "p1")], "nope.jsonl"),
    ("prepare-tokenizer-missing", "prepare_data",
     lambda ws: ["tokenize", "--input", str(ws["root"] / "docs.jsonl"), "--tokenizer", str(ws["root"] / "t.json"),
                 "--output-prefix", str(ws["root"] / "p2")], "t.json"),
    ("prepare-chunk-docs", "prepare_data",
     lambda ws: ["tokenize", "--input", str(ws["root"] / "docs.jsonl"), "--tokenizer", str(ws["root"] / "t.json"),
                 "--output-prefix", str(ws["root"] / "p3"), "--chunk-docs", "0"], "chunk"),
    ("analyze-model-missing", "analyze", lambda ws: [str(ws["root"] / "nomodel"), "--data", str(ws["good"])],
     "nomodel"),
    ("analyze-data-missing", "analyze", lambda ws: [str(ws["root"] / "llama"), "--data", str(ws["root"] / "x")],
     "x.idx not found"),
    ("analyze-both-inputs", "analyze",
     lambda ws: [str(ws["root"] / "llama"), "--data", str(ws["good"]), "--jsonl", str(ws["root"] / "docs.jsonl")],
     "exactly one"),
    ("eval-model-missing", "eval", lambda ws: [str(ws["root"] / "nomodel"), "--tasks", "lambada_openai"], "does not exist"),
    ("eval-task-missing", "eval", lambda ws: [str(ws["root"] / "llama"), "--tasks",
                                              str(ws["root"] / "task.yaml")], "no tokenizer"),
    ("neuromfa-steps", "neuromfa", lambda ws: ["--steps", "1"], "--steps"),
    ("neuromfa-missing", "neuromfa", lambda ws: [str(ws["root"] / "nowhere" / "global_step5"),
                                                 "--out", str(ws["root"] / "m")], "does not exist"),
    ("emergence-config-missing", "emergence", lambda ws: ["--config", str(ws["root"] / "nope.yaml")],
     "config file not found"),
    ("emergence-bad-key", "emergence", lambda ws: ["--set", "nonsense=1"], "nonsense"),
    ("bench-config-missing", "bench", lambda ws: ["--config", str(ws["root"] / "nope.yaml"),
                                                  "--out", str(ws["root"] / "b.json")], "config file not found"),
    ("bench-bad-key", "bench", lambda ws: ["--set", "train.nope=1", "--out", str(ws["root"] / "b.json")],
     "train.nope"),
    ("plot-smooth", "plot", lambda ws: [str(ws["root"] / "empty-run"), "--smooth", "2"], "--smooth"),
    ("plot-no-logs", "plot", lambda ws: [str(ws["root"] / "empty-run")], "no TensorBoard event files"),
]

PROGS = {"pretrain": "l2e-pretrain", "convert": "l2e-convert", "prepare_data": "l2e-prepare-data",
         "analyze": "l2e-analyze", "eval": "l2e-eval", "neuromfa": "l2e-neuromfa", "emergence": "l2e-emergence",
         "bench": "l2e-bench", "plot": "l2e-plot"}


def test_every_entry_point_reports_user_errors_in_one_line(workspace, capsys):
    assert len(CASES) >= 30
    failures = []
    for name, module, argv, phrase in CASES:
        main = importlib.import_module(f"launcher.{module}").main
        before = snapshot(workspace["root"])
        capsys.readouterr()
        try:
            code = main(argv(workspace))
        except SystemExit as exc:  # argparse
            code = exc.code
        err = capsys.readouterr().err
        lines = error_lines(err, PROGS[module])
        after = snapshot(workspace["root"])
        changed = sorted(k for k in before if after.get(k) != before[k])
        added = sorted(k for k in after if k not in before and not k.startswith(("cache/", "run/")))
        if code != 2 or len(lines) != 1 or phrase not in lines[0] or "Traceback" in err or changed or added:
            failures.append(f"{name}: exit {code}, lines {lines}, changed {changed}, added {added}\n{err[-1500:]}")
    assert not failures, "\n".join(failures)


def test_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    from launcher.convert import main

    argv = ["to-hf", str(workspace["root"] / "nowhere"), str(workspace["root"] / "o9")]
    with pytest.raises(Exception, match="does not exist"):
        main([*argv, "--debug"])
    monkeypatch.setenv("L2E_DEBUG", "1")
    with pytest.raises(Exception, match="does not exist"):
        main(argv)


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    import launcher.convert

    def broken(*_args, **_kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("l2e_dist.checkpoint.convert.export_hf", broken)
    with pytest.raises(KeyError):
        launcher.convert.main(["to-hf", "a", "b"])


def test_a_full_disk_error_is_one_line(capsys):
    import errno

    from launcher import run_cli

    @run_cli("l2e-x")
    def main(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")

    assert main([]) == 2
    assert_one_line(capsys.readouterr().err, "l2e-x", "no space left on the device writing /data/out.bin")


# ------------------------------------------------------------------------------------------ multi-process
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "SLURM_",
                                                                      "LOCAL_RANK", "L2E_DEBUG"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)
    return env


def _pretrain_cmd(out: Path, data_cache: str, **extra: object) -> list[str]:
    args = [sys.executable, "-m", "launcher.pretrain", "--config", TINY]
    for item in small_run_overrides(out, data_cache, **extra):
        args += ["--set", item]
    return args


def _run(cmd: list[str], timeout: int = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "mpirun"])
def test_two_rank_launchers_report_once(launcher, workspace, data_cache, tmp_path):
    """The same one line, once, from 2 ranks under each launcher (a different early error each)."""
    out = tmp_path / "run"
    if launcher == "torchrun":
        extra, phrase = {"data.paths": f"[{workspace['root']}/nope]"}, "nope.idx not found"
        prefix = ["torchrun", "--nproc_per_node", "2"]
    elif launcher == "deepspeed":
        extra, phrase = {"parallel.tensor_parallel": 4}, "does not divide the world size 2"
        prefix = ["deepspeed", "--num_gpus", "2"]
    else:
        extra, phrase = {"data.paths": f"[{workspace['garbage']}]"}, "bad header"
        prefix = ["mpirun", "-n", "2", "--oversubscribe"]
    cmd = _pretrain_cmd(out, data_cache, **extra)
    if launcher != "mpirun":
        cmd = [*prefix, "-m", *cmd[2:]] if launcher == "torchrun" else [*prefix, "--module", *cmd[2:]]
    else:
        cmd = [*prefix, *cmd]
    done = _run(cmd)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    if launcher != "torchrun":  # torchrun reports a failed child as its own exit code 1
        assert done.returncode == 2, text[-3000:]
    assert_one_line(text, "l2e-pretrain", phrase)
    assert not out.exists() or not any(out.rglob("global_step*"))


def _srun_tasks_exited(text: str, code: int) -> set[int]:
    """Task ids srun reports as exited with `code`: it prints "task 1: ..." or, merged, "tasks 0-1: ..."."""
    tasks: set[int] = set()
    for spec in re.findall(rf"tasks? ([\d,\-]+): Exited with exit code {code}\b", text):
        for part in spec.split(","):
            first, _, last = part.partition("-")
            tasks.update(range(int(first), int(last or first) + 1))
    return tasks


@pytest.mark.slow
def test_srun_reports_once(workspace, data_cache, tmp_path):
    from tests.test_slurm import LOCAL_SLURM

    if subprocess.run([LOCAL_SLURM, "start"], capture_output=True, timeout=600).returncode != 0:
        pytest.fail("scripts/local_slurm.sh start failed: install Slurm (scripts/test.sh does)")
    # Without --kill-on-bad-exit, so that srun's exit code is the ranks' own (with it, the rank that exits
    # second may be killed first: 143); the line is printed once either way.
    cmd = ["srun", "-N", "1", "-n", "2",
           *_pretrain_cmd(tmp_path / "run", data_cache, **{"data.paths": f"[{workspace['truncated']}]"})]
    done = _run(["timeout", "300", *cmd])
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    assert_one_line(text, "l2e-pretrain", "truncated")
    assert _srun_tasks_exited(text, code=2) == {0, 1}, text[-3000:]


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 48 MiB tmpfs (we run as root), so that a full disk is a real ENOSPC."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_shard_deleted_while_training_then_full_disk_at_checkpoint(workspace, data_cache, tiny_fs, tmp_path):
    """2 ranks, torchrun. (1) The .bin is deleted while training: the run, which maps it, finishes and saves;
    the next run (a resume) says in one line that the file is missing, and touches no checkpoint. (2) The disk
    fills up: with the data back, a resume that must write its next checkpoint is refused before writing,
    in one line, leaving the previous checkpoint and `latest` intact."""
    data = tmp_path / "data"
    data.mkdir()
    for f in workspace["good"].parent.glob(workspace["good"].name + ".*"):
        shutil.copy(f, data / f.name)
    prefix = data / workspace["good"].name
    out = tiny_fs / "run"
    torchrun = ["torchrun", "--nproc_per_node", "2", "-m"]
    base = {"data.paths": f"[{prefix}]", "train.save_interval": 0, "train.keep_last_n": 1,
            "optimizer.lr_decay_iters": 40}  # one lr schedule: the later launches extend the run (run identity)
    first = subprocess.Popen([*torchrun, *_pretrain_cmd(out, data_cache, **base, **{"train.train_iters": 40})[2:]],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    bin_file = Path(str(prefix) + ".bin")
    saved_bin = tmp_path / "saved.bin"
    shutil.copy(bin_file, saved_bin)
    bin_file.unlink()  # mid-run
    text = first.communicate(timeout=400)[0]
    assert first.returncode == 0, text[-3000:]
    assert "final step 40" in text
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "global_step40"
    kept = snapshot(checkpoints)

    resumed = _run([*torchrun, *_pretrain_cmd(out, data_cache, **base, **{"train.train_iters": 60})[2:]])
    assert_one_line(resumed.stdout + resumed.stderr, "l2e-pretrain", f"{prefix}.bin not found")
    assert snapshot(checkpoints) == kept

    shutil.copy(saved_bin, bin_file)
    free = shutil.disk_usage(tiny_fs).free
    checkpoint_bytes = sum(p.stat().st_size for p in (checkpoints / "global_step40").rglob("*") if p.is_file())
    with open(tiny_fs / "ballast", "wb") as f:  # leave half a checkpoint free
        f.write(b"\0" * (free - checkpoint_bytes // 2))
    full = _run([*torchrun, *_pretrain_cmd(out, data_cache, **base, **{"train.train_iters": 45})[2:]])
    text = full.stdout + full.stderr
    assert_one_line(text, "l2e-pretrain", "not enough disk space for checkpoint global_step45")
    assert "resumed from" in text  # it trained from step 40 and failed at the save
    assert snapshot(checkpoints) == kept
    assert not (checkpoints / "global_step45").exists() and not (checkpoints / ".tmp-global_step45").exists()
