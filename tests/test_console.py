"""What a user reads in a job log: a 2-rank run under the DeepSpeed launcher with stdout in a file (not a
terminal) gives timestamped progress lines, the header first, no library noise, and a closing summary whose
paths exist and whose next commands work; a terminal gets a progress bar instead; W&B continues its run."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from l2e_dist.console import log_event, utc_timestamp
from l2e_dist.parallel.launch_env import free_port
from l2e_dist.training.metrics import WANDB_ID_FILE, MetricsLogger
from l2e_dist.training.progress import duration, human_count, train_line, valid_line
from tests.conftest import ROOT, small_run_overrides

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
TRAIN_LINE = re.compile(
    rf"^(?P<time>{TIMESTAMP}) train step (?P<step>\d+)/(?P<total>\d+) \| tokens (?P<tokens>\S+)/(?P<all>\S+) \| "
    r"loss (?P<loss>\S+) \| lr (?P<lr>\S+) \| tok/s (?P<tok_s>\S+) \(last (?P<window>\d+) steps?\) \| "
    r"TFLOP/s/device (?P<tflops>\S+) \| step_time (?P<step_time>\S+)s \| grad_norm (?P<grad_norm>\S+) \| "
    r"rss (?P<rss>\S+)GiB \| ETA (?P<eta>\d+:\d\d:\d\d)(?P<rest>.*)$"
)


def _si(text: str) -> float:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


# ------------------------------------------------------------------------------------------- unit tests


def test_figures_read_as_a_person_writes_them():
    assert [human_count(v) for v in (0, 999, 1234, 1.5e6, 3e11, 2.5e12)] == ["0", "999", "1.23K", "1.5M", "300B",
                                                                          "2.5T"]
    assert [human_count(v) for v in (999.6, 999_400, 999_600)] == ["1K", "999K", "1M"]  # never 1e+03
    assert duration(0) == "0:00:00" and duration(3725) == "1:02:05" and duration(2 * 86400 + 61) == "2d 00:01:01"
    assert duration(float("inf")) == "?"


def test_train_line_has_every_field_and_drops_zero_noise():
    metrics = {"train/loss": 6.21432, "train/lr": 1.94e-3, "train/tokens": 1_228_800, "train/tokens_per_s": 9810.0,
               "train/tflops_per_device": 0.0312, "train/mfu": 0.4123, "train/step_time_s": 0.209,
               "train/grad_norm": 0.8123, "train/max_rss_gib": 1.5, "train/skipped_steps": 0,
               "l2e/layer1/threshold": 5.2, "l2e/layer1/selected_frac": 0.02, "l2e/layer1/nonfinite_steps": 0.0,
               "l2e/layer2/threshold": 4.0, "l2e/layer2/nonfinite_steps": 3.0}
    line = train_line(600, 143000, metrics, total_tokens=300e9, window_steps=10, eta_s=3725.0,
                      timestamp="2026-01-31T12:00:05Z")
    assert line == (
        "2026-01-31T12:00:05Z train step 600/143000 | tokens 1.23M/300B | loss 6.2143 | lr 1.940e-03 | "
        "tok/s 9.81K (last 10 steps) | TFLOP/s/device 0.0312 | MFU 41.2% | step_time 0.209s | grad_norm 0.8123 | "
        "rss 1.5GiB | ETA 1:02:05 | l2e L1[thr 5.2 sel 0.02] L2[thr 4 nonfinite_steps 3]"
    )
    assert valid_line(600, 143000, {"valid/loss": 5.91234, "valid/l2e/layer1/frac_above_ref": 0.0125},
                      timestamp="T") == "T valid step 600/143000 | loss 5.9123 | l2e L1[above_ref 0.0125]"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log_three_steps(tmp_path: Path, monkeypatch, stream: io.StringIO) -> MetricsLogger:
    monkeypatch.setattr(sys, "stdout", stream)
    logger = MetricsLogger(str(tmp_path), enabled=True, total_steps=3, start_step=0, tensorboard=False,
                           progress_bar=True, tokens_per_step=100)
    for step in (1, 2, 3):
        logger.log(step, {"train/loss": 1.0 / step, "train/tokens": 100 * step}, window_steps=1)
        logger.advance(1)
    return logger


def test_a_terminal_gets_the_bar_and_a_file_gets_plain_lines(tmp_path, monkeypatch):
    tty = _log_three_steps(tmp_path / "tty", monkeypatch, _Terminal())
    assert tty.has_progress_bar
    tty.close()
    shown = sys.stdout.getvalue()
    assert "\r" in shown and "3/3" in shown  # tqdm's redraws
    assert len(re.findall(r"train step \d/3 \| tokens", shown)) == 3  # the interval lines, above the bar

    plain = _log_three_steps(tmp_path / "file", monkeypatch, io.StringIO())
    assert not plain.has_progress_bar
    plain.close()
    lines = sys.stdout.getvalue().splitlines()
    assert "\r" not in sys.stdout.getvalue()
    assert [re.match(rf"{TIMESTAMP} train step (\d)/3 \| tokens (\S+) \| loss", x).groups() for x in lines] == [
        ("1", "100/300"), ("2", "200/300"), ("3", "300/300")]
    records = [json.loads(x) for x in (tmp_path / "file" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/tokens"] for r in records] == [100, 200, 300]

    off = MetricsLogger(str(tmp_path / "off"), enabled=True, total_steps=3, start_step=0, tensorboard=False,
                        progress_bar=False)
    monkeypatch.setattr(sys, "stdout", _Terminal())
    assert not MetricsLogger(str(tmp_path / "off2"), enabled=True, total_steps=3, start_step=0, tensorboard=False,
                             progress_bar=False).has_progress_bar  # logging.progress_bar=false wins on a terminal
    off.close()


def test_events_are_timestamped_lines_on_rank_0_only(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    log_event("checkpoint global_step8 is unusable; falling back to global_step7")
    assert capsys.readouterr().out == ""
    log_event("rank 1 sees this", every_rank=True)
    assert re.fullmatch(rf"{TIMESTAMP} l2e-dist: \[rank 1\] rank 1 sees this\n", capsys.readouterr().out)
    monkeypatch.setenv("RANK", "0")
    before = utc_timestamp()
    log_event("snapshot kept")
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{TIMESTAMP} l2e-dist: snapshot kept\n", out) and out[:20] >= before


def test_torch_deprecation_called_by_deepspeed_is_silenced_and_nothing_else(tmp_path):
    """The FutureWarning torch raises for every all_gather_into_tensor call (DeepSpeed's ZeRO gathers) is
    filtered by message, category and module; the same message from elsewhere and other warnings still show."""
    import torch.distributed as dist

    from launcher import quiet_known_warnings

    def gather() -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:
                quiet_known_warnings()
            dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))  # the real call, through torch
            warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated. (elsewhere)",
                                   FutureWarning, "ours.py", 1, module="ours")
            warnings.warn("a real warning", UserWarning, stacklevel=1)
        return caught

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        quiet = False
        loud = [(w.category, str(w.message)) for w in gather()]
        quiet = True
        quiet_shown = [(w.category, str(w.message)) for w in gather()]
    finally:
        dist.destroy_process_group()
    deprecated = [text for category, text in loud if "all_gather_into_tensor` is deprecated" in text]
    assert len(deprecated) == 2 and loud[0][0] is FutureWarning  # torch's own (from DeepSpeed's call) + planted
    assert quiet_shown == [(FutureWarning, deprecated[1]), (UserWarning, "a real warning")]


class _FakeWandb:
    """Records wandb.init's keyword arguments (no network, no files)."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int]] = []

    def module(self) -> types.ModuleType:
        fake = types.ModuleType("wandb")
        fake.init = self._init
        return fake

    def _init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda metrics, step: self.logged.append((metrics, step)),
                                     finish=lambda: None)


def test_wandb_run_id_is_kept_and_a_requeued_job_continues_the_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    monkeypatch.setenv("WANDB_MODE", "unset")  # restored (removed) after the test: the logger sets it
    monkeypatch.delenv("WANDB_MODE")

    def job(out: Path, start: int) -> None:
        logger = MetricsLogger(str(out), enabled=True, total_steps=10, start_step=start, tensorboard=False,
                               wandb=True, wandb_project="proj", progress_bar=False, run_config={"seed": 1})
        logger.log(start + 1, {"train/loss": 1.0}, console=False)
        logger.close()

    job(tmp_path / "run", 0)
    job(tmp_path / "run", 5)  # the requeued job: same output_dir
    job(tmp_path / "other", 0)
    first, requeued, other = fake.inits
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    assert first["id"] == requeued["id"] == run_id and first["resume"] == requeued["resume"] == "allow"
    assert other["id"] != run_id and other["id"] == (tmp_path / "other" / WANDB_ID_FILE).read_text().strip()
    assert first["project"] == "proj" and first["config"] == {"seed": 1} and first["dir"] == str(tmp_path / "run")
    assert [step for _, step in fake.logged] == [1, 6, 1]
    assert os.environ["WANDB_MODE"] == "offline"  # logging.wandb_mode's default


# ------------------------------------------------------------------------- a real job log (2 ranks, a file)


def _padded_vocab(snapshot: Path) -> int:
    state = torch.load(snapshot / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    return state["module"]["embed_in.weight"].shape[0]


@pytest.mark.slow
def test_a_two_rank_deepspeed_job_log(tmp_path, data_cache):
    out = tmp_path / "run"
    steps, interval, seq, batch = 20, 5, 32, 8
    overrides = small_run_overrides(out, data_cache, **{
        "train.train_iters": steps, "train.log_interval": interval, "train.eval_interval": 10,
        "train.eval_iters": 1, "train.save_interval": 10, "train.extra_save_steps": "[0,10]",
        "logging.tensorboard": True, "logging.progress_bar": True,  # allowed, but stdout is no terminal
        "l2e.method": "l2e", "l2e.layers": "[0,1]", "optimizer.grad_clip": 1.0,
        "parallel.device": "cpu",  # 2 ranks on any machine (the GPU line differs: gpu_mem, MFU)
    })
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launcher.pretrain",
               "--config", "configs/tiny.yaml", *[a for item in overrides for a in ("--set", item)]]
    log_path = tmp_path / "job.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters, as a user's
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with open(log_path, "w") as log:  # as sbatch does: stdout and stderr into one file
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = log_path.read_text()
    print(text)  # the excerpt shown in docs/logging.md comes from here (pytest -s)
    assert proc.returncode == 0, text[-4000:]

    assert "\r" not in text  # no progress-bar redraws in a file
    assert "all_gather_into_tensor" not in text and "FutureWarning" not in text
    assert "Transformer Engine and Apex" not in text
    # No Python warning at all from the ranks; DeepSpeed's launcher processes log their own `[...] [WARNING]`
    # lines (one "Setting accelerator to CPU" each: the runner and launch.py), the ranks none.
    assert not [x for x in text.splitlines() if "Warning" in x and not x.startswith("[20")]
    assert text.count("Setting accelerator to CPU") <= 2
    assert "nonfinite_steps" not in text  # a zero count is noise on the console ...
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "train/loss" in r}
    assert all(r["l2e/layer0/nonfinite_steps"] == 0 for r in train.values())  # ... but stays in metrics.jsonl

    lines = text.splitlines()
    ours = [i for i, x in enumerate(lines) if re.match(rf"{TIMESTAMP} (l2e-dist:|train |valid )", x)]
    header = lines[ours[0]]
    assert re.fullmatch(rf"{TIMESTAMP} l2e-dist: world=2 tp=1 dp=2 zero=1 precision=fp32 params=\S+ gas=2 "
                        r"l2e=l2e device=cpu resume_step=0", header), header  # the first line, alone
    assert re.fullmatch(rf"{TIMESTAMP} l2e-dist: train_iters=20 tokens/step=256 \(total 5.12K\) log_interval=5 "
                        rf"output_dir={re.escape(str(out))}", lines[ours[1]])

    progress = [TRAIN_LINE.match(x) for x in lines if " train step " in x]
    assert all(progress), [x for x in lines if " train step " in x]
    assert [int(m["step"]) for m in progress] == list(range(interval, steps + 1, interval))
    flops_per_token = _flops_per_token(_padded_vocab(out / "snapshots" / "step0"), seq)
    for m in progress:
        step, logged = int(m["step"]), train[int(m["step"])]
        assert int(m["total"]) == steps and m["all"] == human_count(steps * seq * batch)
        assert m["tokens"] == human_count(step * seq * batch) and logged["train/tokens"] == step * seq * batch
        assert float(m["loss"]) == pytest.approx(logged["train/loss"], abs=5e-5)
        assert int(m["window"]) == interval
        assert _si(m["tok_s"]) == pytest.approx(logged["train/tokens_per_s"], rel=5e-3)
        # TFLOP/s per device = tokens/s x model FLOPs per token / 2 devices, the FLOPs counted here afresh
        assert float(m["tflops"]) == pytest.approx(logged["train/tokens_per_s"] * flops_per_token / 2 / 1e12,
                                                   rel=5e-3)
        assert float(m["step_time"]) == pytest.approx(logged["train/step_time_s"], rel=5e-3)
        assert float(m["grad_norm"]) == pytest.approx(logged["train/grad_norm"], rel=5e-4)
        assert re.fullmatch(r"( \| l2e L0\[.+\] L1\[.+\])?", m["rest"]), m["rest"]
    assert re.fullmatch(r" \| l2e L0\[thr \S+ sel \S+.*\] L1\[thr \S+ sel \S+.*\]", progress[-1]["rest"])
    assert progress[-1]["eta"] == "0:00:00"
    assert lines.index(progress[0].string) > ours[1]
    valid = [x for x in lines if " valid step " in x]
    assert [re.match(rf"{TIMESTAMP} valid step (\d+)/20 \| loss \S+ \| l2e L0\[above_ref", x)[1] for x in valid] == [
        "10", "20"]

    end = lines.index("final step 20")
    assert lines[end + 1] == f"final loss {train[steps]['train/loss']:.6f}"
    summary = [x.split(" l2e-dist: ", 1)[1] for x in lines[end + 2:] if " l2e-dist: " in x]
    assert re.fullmatch(r"finished at step 20 in \d+:\d\d:\d\d wall: 20 steps, 5.12K tokens in this job "
                        r"\(5.12K since step 0\)", summary[0])
    valid_loss = [r["valid/loss"] for r in records if r["step"] == steps and "valid/loss" in r][0]
    assert summary[1] == (f"last train loss {train[steps]['train/loss']:.4f} (step 20), "
                          f"valid loss {valid_loss:.4f} (step 20)")
    named = dict(x.split(": ", 1) for x in summary[2:] if not x.startswith("next: "))
    assert named["checkpoints"] == f"{out / 'checkpoints'} (latest global_step20)"
    assert named["snapshots"] == f"{out / 'snapshots'} (2: step0 .. step10)"
    for key in ("checkpoints", "snapshots", "metrics", "tensorboard"):
        assert Path(named[key].split(" ")[0]).exists(), key
    assert any((out / "tensorboard").iterdir())

    commands = [shlex.split(x.removeprefix("next: "), comments=True) for x in summary if x.startswith("next: ")]
    convert = next(c for c in commands if c[:2] == ["l2e-convert", "to-hf"] and "--all" not in c)
    done = subprocess.run([sys.executable, "-m", "launcher.convert", *convert[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (Path(convert[3]) / "config.json").is_file()
    evaluate = next(c for c in commands if c[0] == "l2e-eval")
    from launcher.eval import build_parser

    parsed = build_parser().parse_args(evaluate[1:])  # the printed command is valid l2e-eval syntax
    assert parsed.models == [str(out)]  # ... and evaluates this run across its snapshots


def _flops_per_token(padded_vocab: int, seq: int, layers: int = 2, hidden: int = 64) -> float:
    """Training FLOPs per token: 6 x (weight-matrix parameters + attention's 2 x seq x hidden per layer)."""
    ffn = 4 * hidden
    return 6 * (layers * (4 * hidden * hidden + 2 * hidden * ffn) + padded_vocab * hidden + layers * 2 * seq * hidden)
