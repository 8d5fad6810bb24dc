"""Stop cleanly when the scheduler says so, and die quickly (naming the culprit) when a peer is gone.

`PreemptionHandler`: Slurm sends SIGUSR1 before the time limit (`#SBATCH --signal=USR1@<s>`) and SIGTERM
when it preempts or cancels. The handler only sets a flag; the training loop asks `should_stop()` every
`check_every` steps, which agrees across ranks with one tiny all_reduce (MAX), so every rank finishes the
same step, checkpoints, and leaves together. `requeue()` then puts the job back in the queue (rank 0).

`Watchdog`: a daemon thread that ends the process when the loop has not called `heartbeat()` within its
timeout. Each rank's thread also publishes its last heartbeat to the rendezvous TCPStore, so the rank that
times out can say which peer went silent or fell behind (the usual cause: a dead or stuck rank leaves the
others blocked in a collective).
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

_STORE_PREFIX = "l2e_watchdog/"
_STORE_GRACE_S = 3.0


def _say(message: str) -> None:
    """Write one line to stderr with a plain write(): safe inside signal handlers and dying threads."""
    os.write(2, (message.rstrip("\n") + "\n").encode())


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class PreemptionHandler:
    """Turns scheduler signals into one agreed stop decision at a step boundary."""

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), check_every: int = 10):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.signals = tuple(signal.Signals[name] if isinstance(name, str) else name for name in signals)
        self.check_every = check_every
        self.received: str | None = None

    def install(self) -> None:
        """Install the handlers (main thread only, as Python requires)."""
        for signum in self.signals:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first:
            _say(
                f"rank {_rank()}: received {signal.Signals(signum).name}; will checkpoint and stop "
                f"at the next check (every {self.check_every} steps)"
            )

    def should_stop(self, group: dist.ProcessGroup | None = None, step: int | None = None) -> bool:
        """True on every rank once any rank got a signal. Collective: all ranks of `group` must call it
        with the same `step`; with `step` given, only steps divisible by `check_every` communicate."""
        if step is not None and step % self.check_every != 0:
            return False
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def requeue(self) -> bool:
        """On rank 0 of a requeueable Slurm job: `scontrol requeue $SLURM_JOB_ID`. Returns True when
        requeued. Call it after the checkpoint and a barrier: Slurm then ends this run and restarts the
        same batch script, which resumes from the checkpoint. Other ranks and non-Slurm runs: no-op."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if _rank() != 0 or not job_id:
            return False
        scontrol = shutil.which("scontrol")
        if scontrol is None:
            _say(f"rank 0: cannot requeue Slurm job {job_id}: scontrol not on PATH; resubmit to resume")
            return False
        show = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
        if show.returncode != 0 or "Requeue=1" not in show.stdout.split():
            _say(
                f"rank 0: Slurm job {job_id} is not requeueable (submit with --requeue); "
                "resubmit the same command to resume from the checkpoint"
            )
            return False
        done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True)
        if done.returncode != 0:
            _say(f"rank 0: scontrol requeue {job_id} failed: {done.stderr.strip()}; resubmit to resume")
            return False
        _say(f"rank 0: requeued Slurm job {job_id}; it will resume from the checkpoint")
        return True


@dataclass(frozen=True)
class _Beat:
    deadline: float  # time.monotonic() by which the next heartbeat must come
    allowed_s: float
    step: int | None
    phase: str


class Watchdog:
    """Ends the process (exit code `exit_code`) when `heartbeat()` is not called within the timeout."""

    def __init__(
        self,
        timeout_s: float,
        exit_code: int = 1,
        share_progress: bool = True,
        poll_s: float | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be > 0 s, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.exit_code = exit_code
        self.rank = _rank()
        self.world_size = _world_size()
        self.share_progress = share_progress and self.world_size > 1 and "MASTER_ADDR" in os.environ
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.2, self.timeout_s / 10))
        self.publish_every_s = max(1.0, self.timeout_s / 5)
        self._beat = _Beat(time.monotonic() + self.timeout_s, self.timeout_s, None, "start")
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="l2e-watchdog", daemon=True)
        self._store: dist.TCPStore | None = None

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Call before leaving the loop normally (e.g. before destroy_process_group)."""
        self._stopped.set()
        self._thread.join(timeout=self.poll_s + 5)

    def heartbeat(self, step: int | None = None, phase: str = "train", allow_s: float | None = None) -> None:
        """The loop is alive. `allow_s` grants a longer deadline for a known slow phase (checkpoint)."""
        allowed = allow_s or self.timeout_s
        self._beat = _Beat(time.monotonic() + allowed, allowed, step, phase)

    def _connect(self) -> dist.TCPStore:
        if self._store is None:
            self._store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=min(5.0, self.timeout_s / 2)),
                wait_for_workers=False,
            )
        return self._store

    def _publish(self, beat: _Beat) -> None:
        try:
            self._connect().set(f"{_STORE_PREFIX}{self.rank}", f"{beat.step}|{time.time():.3f}|{beat.phase}")
        except Exception:  # the store may be gone (rank 0 died); the timeout still works
            self._store = None

    def _run(self) -> None:
        last_publish = -float("inf")
        while True:
            beat, now = self._beat, time.monotonic()
            if now > beat.deadline:
                self._fire(beat)
            if self.share_progress and now - last_publish >= self.publish_every_s:
                self._publish(beat)
                last_publish = time.monotonic()
            if self._stopped.wait(self.poll_s):
                return

    def _peers_report(self) -> str:
        """Which ranks went silent or fell behind, from what every watchdog published to the store."""
        try:
            store = self._connect()
            keys = [f"{_STORE_PREFIX}{r}" for r in range(self.world_size)]
            if store.check(keys):
                values = [v.decode() for v in store.multi_get(keys)]
            else:
                values = [store.get(k).decode() if store.check([k]) else "" for k in keys]
        except Exception as error:  # any store failure is itself the diagnosis
            return (
                f"rendezvous store {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} unreachable "
                f"({type(error).__name__}); rank 0 or its host is probably gone"
            )
        silent_after = 3 * self.publish_every_s + self.poll_s
        now, notes, steps = time.time(), [], {}
        for peer, value in enumerate(values):
            if not value:
                notes.append(f"rank {peer} never reported")
                continue
            step, stamp, phase = value.split("|", 2)
            steps[peer] = int(step) if step != "None" else -1
            if now - float(stamp) > silent_after:
                notes.append(f"rank {peer} silent for {now - float(stamp):.0f} s (step {step}, {phase})")
        if steps:
            newest = max(steps.values())
            notes += [
                f"rank {peer} behind at step {s}"
                for peer, s in steps.items()
                if s < newest and not any(n.startswith(f"rank {peer} ") for n in notes)
            ]
        return (
            "; ".join(notes[:16])
            or "none: every rank's watchdog is alive at the same step (a rank may be stuck inside it)"
        )

    def _fire(self, beat: _Beat) -> None:
        where = f"step {beat.step}, phase '{beat.phase}'"
        _say(
            f"rank {self.rank}: watchdog: no heartbeat for {beat.allowed_s:.0f} s ({where}); "
            "this rank or a peer is dead or stuck"
        )
        if self.share_progress:
            report: list[str] = []
            probe = threading.Thread(target=lambda: report.append(self._peers_report()), daemon=True)
            probe.start()
            probe.join(timeout=10.0)
            _say(f"rank {self.rank}: watchdog: suspects: {report[0] if report else 'store did not answer'}")
            if self.rank == 0:  # rank 0 hosts the store: keep it up briefly so the peers can report too
                time.sleep(_STORE_GRACE_S)
        _say(f"rank {self.rank}: watchdog: exiting with code {self.exit_code}")
        # Flush buffered log lines, but never wait on a stdout lock the stuck main thread may hold.
        flusher = threading.Thread(target=sys.stdout.flush, daemon=True)
        flusher.start()
        flusher.join(timeout=1.0)
        os._exit(self.exit_code)


def start_watchdog(timeout_s: float, **kwargs: object) -> Watchdog:
    """Start a `Watchdog` (after init_process_group, so rank and store are known)."""
    return Watchdog(timeout_s, **kwargs).start()
