"""Ranks end with their launcher: a rank whose launcher is gone exits at once and writes nothing further.

torchrun starts its workers in their own sessions, so a `kill -9` of torchrun (an OOM kill, a job manager
that signals only the launcher) would leave them training and writing checkpoints into an output_dir that a
restarted job then shares. Two mechanisms, armed once per rank by `watch_launcher()`:

1. Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`): the kernel kills the rank the moment
   its parent dies, whatever the rank is doing; a checkpoint being written stays in its temporary directory.
   The signal follows the parent *thread* that forked the rank; torchrun's agent, the DeepSpeed launcher
   (`deepspeed.launcher.launch`) and mpirun start their ranks from their main thread, so it fires only when
   the launcher process dies.
2. A daemon thread that polls every `POLL_S` seconds that the rank's parent is unchanged (and, under the
   DeepSpeed launcher, that the `deepspeed` runner which started the per-node `deepspeed.launcher.launch`
   is too: killing the runner alone orphans launch.py, which would keep its ranks alive). It catches what
   the signal cannot: a non-Linux kernel, the grandparent, a parent that died before the signal was armed.
   `exit_if_launcher_gone()` repeats the check right before a checkpoint is published (renamed into place).

Armed only under a launcher (torchrun, the DeepSpeed launcher, mpirun, srun), found from the variables each
one sets. A process started directly from a shell is never tied to it: closing a terminal with `nohup` or
a detached single-process run must keep training.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass

POLL_S = 1.0  # how often the thread checks the launcher: ranks are gone within about this much
LAUNCHER_GONE_EXIT = 1
_PR_SET_PDEATHSIG = 1
_DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def detect_launcher(environ: Mapping[str, str] | None = None) -> str | None:
    """Which launcher started this process ("torchrun", "deepspeed", "mpirun", "srun"), None for a shell."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # deepspeed.launcher.launch sets these
        return "deepspeed"
    if any(name in env for name in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK")):
        return "mpirun"
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return "srun"
    return None


def proc_stat_field(pid: int, index: int) -> int | None:
    """Field `index` of /proc/<pid>/stat counted from the state field after "pid (comm)" (1: the parent PID,
    19: the start time in clock ticks since boot); None when the process is gone or /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[index])


def _parent_of(pid: int) -> int | None:
    """The parent PID of `pid` (None when it is gone or /proc is unavailable)."""
    return proc_stat_field(pid, 1)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class LauncherWatch:
    """What this rank watches: its parent and, under the DeepSpeed launcher, the parent's parent."""

    launcher: str
    parent: int  # os.getppid() when armed
    grandparent: int | None  # watched through the parent's /proc entry
    death_signal_armed: bool

    def gone(self) -> str | None:
        """None while the launcher lives, else what is gone (for the one line printed before exiting)."""
        if os.getppid() != self.parent:
            return f"its parent process {self.parent} ({self.launcher}) is gone"
        if self.grandparent is not None and _parent_of(self.parent) != self.grandparent:
            return f"the {self.launcher} launcher (PID {self.grandparent}) that started PID {self.parent} is gone"
        return None


_watch: LauncherWatch | None = None
_lock = threading.Lock()


def _arm_death_signal() -> bool:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) for this process; False where the kernel has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die(reason: str) -> None:
    rank = next((os.environ[v] for v in _RANK_VARS if os.environ.get(v, "").isdigit()), "?")
    os.write(2, f"rank {rank}: {reason}; exiting without writing anything more\n".encode())
    os._exit(LAUNCHER_GONE_EXIT)


def _poll(watch: LauncherWatch, poll_s: float) -> None:
    stop = threading.Event()
    while not stop.wait(poll_s):
        reason = watch.gone()
        if reason is not None:
            _die(reason)


def watch_launcher(environ: Mapping[str, str] | None = None, poll_s: float = POLL_S) -> LauncherWatch | None:
    """Tie this rank to its launcher (see the module docstring). Call it first thing in a rank; later calls
    return the first call's watch. None (nothing armed) when no launcher started this process."""
    global _watch
    with _lock:
        if _watch is not None:
            return _watch
        launcher = detect_launcher(environ)
        if launcher is None:
            return None
        parent = os.getppid()
        armed = _arm_death_signal()
        grandparent = None
        if launcher == "deepspeed" and _DEEPSPEED_NODE_LAUNCHER in _command_line(parent):
            grandparent = _parent_of(parent)
        _watch = LauncherWatch(launcher, parent, grandparent, armed)
    reason = _watch.gone()  # the parent may have died before the signal was armed
    if reason is not None:
        _die(reason)
    threading.Thread(target=_poll, args=(_watch, poll_s), name="l2e-launcher-watch", daemon=True).start()
    return _watch


def exit_if_launcher_gone() -> None:
    """Before publishing anything (renaming a checkpoint into place): exit at once if the launcher is gone."""
    if _watch is not None:
        reason = _watch.gone()
        if reason is not None:
            _die(reason)
