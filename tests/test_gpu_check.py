"""scripts/gpu_check.sh --cpu-smoke runs end to end on CPU (tiny shapes, fp32), so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from l2e_dist.parallel.launch_env import free_port
from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_one_json_and_log(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "cpu-smoke" and not report["failed"]
    assert [s["name"] for s in report["steps"]] == ["cuda_tests", "bench_tiny_compile-false", "pretrain"]
    assert report["cuda_tests"]["ran"] and report["cuda_tests"]["counts"]["skipped"] >= 5  # no CUDA here
    bench = report["bench"]["bench_tiny_compile-false"]
    assert set(bench["variants"]) == {"none", "l2e", "memel"} and bench["precision"] == "fp32"
    assert set(bench["overhead_vs_none"]) == {"l2e/none", "memel/none"}
    run = report["pretrain"]
    assert run["finite"] and run["falling"] and run["steps"] == 12


def test_gpu_check_usage_errors(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
