"""The training benchmark's machinery (not its timings): same weights and batch for every variant, the collective
counter attributes calls to their source, and the report carries every figure the table prints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from tests.conftest import ROOT
from tests.distributed import run_distributed

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=2", "model.vocab_size=300",
    "model.max_position_embeddings=32", "l2e.forget_steps=1",
]


def _count_collectives() -> dict:
    """In an initialised world of 1: the counter attributes 3 direct calls, the engine's fused all_reduce and a
    barrier, and restores torch.distributed afterwards."""
    from l2e_dist.config_utils import build
    from l2e_dist.l2e import L2EConfig, L2EInhibitor
    from l2e_dist.parallel.collectives import CollectiveCounter
    from l2e_dist.parallel.state import tensor_and_data_parallel_group

    original = dist.all_reduce
    inhibitor = L2EInhibitor(build(L2EConfig, {"method": "l2e"}, "l2e"), [0], 8,
                             reduce_group=tensor_and_data_parallel_group())
    with CollectiveCounter() as counter:
        for _ in range(3):
            dist.all_reduce(torch.ones(2))
        inhibitor.apply(0, torch.randn(4, 8, requires_grad=True))
        inhibitor.finish_micro_batch()
        inhibitor.end_step()
        dist.barrier()
    return {"counts": dict(counter.counts), "restored": dist.all_reduce is original,
            "engine": inhibitor.collective_count}


def test_state_bytes_counts_each_storage_once():
    from l2e_dist.checkpoint.io import state_bytes

    a, b = torch.zeros(10), torch.zeros(3, dtype=torch.float64)
    assert state_bytes([[a, a[2:], None], {"x": {"y": (b, 1.0)}}, a.view(2, 5)]) == 10 * 4 + 3 * 8


def _smoke(out_path: str) -> dict:
    from l2e_dist.bench import BenchSettings, format_table, run_benchmark, write_report
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    dist.init_process_group("gloo")
    init_process_groups(1)
    try:
        counted = _count_collectives()
        settings = BenchSettings(configs=[str(ROOT / "configs" / "tiny.yaml")], overrides=TINY, rounds=2, warmup=1,
                                 seq_length=16, micro_batch_size=2, memory_probe=False)
        report = run_benchmark(settings)
    finally:
        destroy_process_groups()
    write_report(report, out_path)
    return {"report": report, "table": format_table(report), "counted": counted}


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = run_distributed(_smoke, 1, str(out))[0]
    counted = result["counted"]
    assert counted["restored"] and counted["engine"] == 1
    assert counted["counts"] == {"total": 5, "other": 4, "l2e": 1, "op:all_reduce": 4, "op:barrier": 1}
    report = json.loads(out.read_text())  # the written file: every check below reads it, not the returned dict
    variants = report["variants"]
    assert list(variants) == ["none", "l2e", "memel", "hf"]
    # same weights and batch: before any inhibition (late start) every variant computes HF's first loss
    reference = variants["hf"]["first_step_loss"]
    for name in ("none", "l2e", "memel"):
        assert variants[name]["first_step_loss"] == pytest.approx(reference, rel=1e-5), name
    meta = report["meta"]
    assert (meta["rounds"], meta["seq_length"], meta["micro_batch_size"]) == (2, 16, 2)  # the settings above
    assert meta["tokens_per_step"] == 32  # micro batch 2 x 16 tokens, no accumulation
    for name, v in variants.items():
        first, second = v["step_times_s"]  # one timed step per round, 2 rounds
        assert min(first, second) > 0, name
        # the median of two times is their mean: the reported median and throughput follow from the raw times
        assert v["step_time_s"]["median"] == pytest.approx((first + second) / 2), name
        assert v["tokens_per_s"] == pytest.approx(32 / ((first + second) / 2)), name
        assert v["state_bytes"] > 0
    # the timed L2E/MEmeL steps selected (warm-up covered late start + calibration) and reduced once per step
    assert report["meta"]["warmup_steps"] == 1 + 2  # every variant: late start + calibration + `warmup`
    for name in ("l2e", "memel"):
        assert variants[name]["collectives_per_step"]["l2e"] == 1.0
        assert variants[name]["inhibitor_collectives_per_step"] == 1.0
    assert "l2e" not in variants["none"]["collectives_per_step"]
    assert variants["hf"]["collectives_per_step"] == {"total": 0.0}
    assert set(report["ratios"]) == {"l2e/none", "memel/none", "none/hf", "l2e/hf"}
    # of two rounds the ratio of medians is the ratio of the summed raw times
    ratio = report["ratios"]["l2e/none"]["of_medians"]
    assert ratio == pytest.approx(sum(variants["l2e"]["step_times_s"]) / sum(variants["none"]["step_times_s"]))
    table = result["table"]
    assert "batch 2x1x16 = 32 tokens/step" in table and "2 rounds after 3 warm-up steps each" in table, table
    assert "l2e/none" in table and "hf" in table


def test_cli_reports_config_errors_in_one_line(capsys):
    from launcher.bench import main

    assert main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--set", "model.hidden_size=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("l2e-bench: error: config error at 'model.hidden_size'") and "\n" not in err
