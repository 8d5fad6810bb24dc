"""The host-memory settings of a training process: applied by its entry point (not by importing anything), THP
early enough to reach torch, and freed host memory kept mapped on CPU so a step's buffers are reused without page
faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A fresh process (mallopt is process-wide and the setting is applied once): the settings applied first, as
# l2e-pretrain applies them, then the process groups as a CPU run sets them up, then the same 4 MiB buffer
# allocated, written and freed as a training step does with its activations.
_PROBE = textwrap.dedent(
    """
    import json, resource
    from l2e_dist.parallel.host_memory import apply_process_settings

    settings = apply_process_settings()
    import torch
    from l2e_dist.parallel.state import destroy_process_groups, init_process_groups

    init_process_groups(1, device="cpu")
    source = torch.ones(1 << 20)
    def cycle():
        buffer = torch.empty(1 << 20)
        buffer.copy_(source)
        del buffer
    for _ in range(3):  # the first cycles grow the heap
        cycle()
    # This thread's faults only: DeepSpeed's first initialisation loads its CPU comm op on another thread.
    faults = []
    for _ in range(21):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        cycle()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    destroy_process_groups()
    # The median cycle: a rare fault from the kernel's own page handling (THP compaction) is not the allocator's.
    print(json.dumps({"applied": settings.kept_host_memory, "faults_per_cycle": sorted(faults)[10], "faults": faults}))
    """
)


def _run_python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter with a clean environment (no THP or malloc settings, no launcher
    variables) and return the JSON object its last line prints."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "L2E_KEEP_HOST_MEMORY"))}
    environ.update(env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        environ.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(**env: str) -> dict:
    return _run_python(_PROBE, **env)


@pytest.mark.slow
def test_a_cpu_run_reuses_freed_buffers_without_page_faults() -> None:
    kept = _probe()
    assert kept["applied"] is True
    # 4 MiB is 1024 pages: a buffer that was unmapped and mapped again faults in hundreds of them per cycle.
    assert kept["faults_per_cycle"] <= 2, kept
    opted_out = _probe(L2E_KEEP_HOST_MEMORY="0")
    assert opted_out["applied"] is False
    # The control: with glibc's defaults (and THP's 2 MiB-aligned allocations) the same cycle does fault, so
    # the assertion above is what the setting buys and can fail.
    assert opted_out["faults_per_cycle"] > 100, opted_out


# Imports every entry point (nothing may change), then runs l2e-pretrain's main as far as --print-config (config
# loaded: megatron-core imported, which allocates tensors), then allocates a 64 MiB tensor: with THP applied in
# time, its pages are huge pages (AnonHugePages grows). `late` is the control: the variable set by hand after the
# same imports and one tensor allocation is never seen by torch.
_ENTRY_POINT = textwrap.dedent(
    """
    import contextlib, io, json, os
    import launcher, launcher.analyze, launcher.bench, launcher.convert, launcher.emergence, launcher.eval
    import launcher.neuromfa, launcher.plot, launcher.prepare_data, launcher.pretrain
    from l2e_dist.parallel import host_memory

    def huge_kib():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])

    after_import = {"thp": os.environ.get("THP_MEM_ALLOC_ENABLE"), "applied": host_memory.applied_process_settings()}
    late = LATE
    with contextlib.redirect_stdout(io.StringIO()):
        if late:
            import torch
            torch.zeros(1)  # torch reads THP_MEM_ALLOC_ENABLE once, at its first host allocation
            os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        else:
            assert launcher.pretrain.main(["--config", "configs/tiny.yaml", "--print-config"]) == 0
    import torch
    before = huge_kib()
    tensor = torch.ones(16 << 20)
    settings = host_memory.applied_process_settings()
    print(json.dumps({"after_import": after_import, "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                      "kept": settings and settings.kept_host_memory, "huge_kib": huge_kib() - before}))
    """
)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "absent"


@pytest.mark.slow
def test_the_entry_point_applies_the_settings_and_importing_applies_none() -> None:
    import torch

    applied = _run_python(_ENTRY_POINT.replace("LATE", "False"))
    assert applied["after_import"] == {"thp": None, "applied": None}, applied
    assert applied["thp"] == "1"
    assert applied["kept"] is (not torch.cuda.is_available()), applied
    if _thp_mode() == "madvise":  # huge pages only where madvised: the control can tell in time from too late
        assert applied["huge_kib"] >= 2048, applied
        late = _run_python(_ENTRY_POINT.replace("LATE", "True"))
        assert late["after_import"] == {"thp": None, "applied": None}, late
        assert late["huge_kib"] == 0, late
