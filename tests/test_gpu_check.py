"""scripts/gpu_check.sh --cpu-smoke runs end to end on CPU (tiny shapes, fp32), so the GPU check cannot rot."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import zipfile

import pytest

from l2e_dist.parallel.launch_env import free_port
from tests.conftest import ROOT

PROBE = "l2e_gpu_check_probe"


def fake_wheel_folder(folder) -> None:
    """A wheel folder like gpu-wheels/ holding one pure-Python wheel (a module that says where it was imported
    from), so the offline install runs on any machine, also a CI clone without gpu-wheels/."""
    folder.mkdir()
    files = {f"{PROBE}.py": "import os\nWHERE = os.path.dirname(__file__)\n",
             f"{PROBE}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
             f"{PROBE}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files[f"{PROBE}-1.0.dist-info/RECORD"] = "\n".join(record + [f"{PROBE}-1.0.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{PROBE}-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_one_json_and_log(tmp_path):
    """The whole check on CPU: the offline install of a wheel folder into WORK/site (then importable),
    `python3` only (the GPU image has no `python`: a `python` on PATH fails here), every step's JSON, the targets."""
    fake_wheel_folder(tmp_path / "wheels")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text("#!/bin/sh\necho 'python is not on the GPU image: use python3' >&2\nexit 127\n")
    (shim / "python").chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"GPU_CHECK_WORK": str(work), **os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECK_PORT": str(free_port()),
           "GPU_WHEELS": str(tmp_path / "wheels"), "PATH": f"{shim}:{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu-smoke"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tmp_path = out
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["mode"] == "cpu-smoke" and not report["failed"]
    assert [s["name"] for s in report["steps"]] == ["install", "steps", "bench_eager", "pretrain", "cuda_tests"]
    assert report["cuda_tests"]["ran"] and report["cuda_tests"]["counts"]["skipped"] >= 4  # no CUDA here
    installed = subprocess.run(["python3", "-c", f"import {PROBE}; print({PROBE}.WHERE)"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(work / "site")}, check=True)
    assert installed.stdout.strip() == str(work / "site")
    returned = sorted(p.name for p in out.iterdir() if p.is_file())  # what a device call would bring back
    assert returned == ["bench_eager.json", "env.json", "gpu_check.json", "gpu_check.log", "logits.json",
                        "nccl.json"], returned
    assert report["env"]["ok"] and report["env"]["versions"]["deepspeed"] and report["env"]["versions"]["torch"]
    assert report["nccl"]["backend"] == "gloo" and report["nccl"]["l2e_state_entries"] > 0
    assert report["logits"]["ok"] and report["targets"]["bf16_logits_vs_transformers"]["met"]
    assert report["targets"]["loss_falling"]["met"] and report["targets"]["mfu/bench_eager"]["met"] is None
    bench = report["bench"]["bench_eager"]
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
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--cpu-smoke"],
                          capture_output=True, text=True, env={**os.environ, "GPU_CHECK_BENCH_CASES": "eager bogus"})
    assert proc.returncode == 2 and "unknown bench case bogus" in proc.stderr
    assert not (tmp_path / "work" / "steps.tsv").read_text()  # refused before any step ran
