"""One job per output_dir: rank 0 holds `<output_dir>/.run.lock` for the run's lifetime.

flock is not reliable on every shared file system clusters use, so the lock is a file: JSON naming the
holder (host, PID and its start time, Slurm job id and restart count, start time) and a heartbeat time that a
daemon thread refreshes every `heartbeat_s`. It is created with link(2) of a fully written temporary file,
atomic also over NFS (success is read from the temporary file's link count, as NFS clients must), so exactly
one of two racing jobs gets it. A second job finds it and is refused in one line, unless its holder is dead:

- its heartbeat is older than `STALE_AFTER_BEATS` x the holder's interval (any host);
- the holder's PID is gone (or is another process now) on this very host, in this PID namespace;
- it is an earlier incarnation of this same Slurm job (same job id, lower SLURM_RESTART_COUNT): a requeued
  job restarts after Slurm has ended the previous one, possibly on another node, within the stale time.

A dead holder's lock is taken over (one log line): renamed aside, checked to be the very file judged dead
(else it is put back and the decision starts over), then created afresh as above. A lock file that cannot be
read as a lock counts as one whose heartbeat is its modification time. If a holder ever finds its lock taken
(its heartbeat thread stalled past the stale time), it exits rather than become a second writer.
The lock is removed when the run ends normally or with an error; a killed run leaves it for the next to take.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from l2e_dist.errors import UserError, environment_error_message
from l2e_dist.fileio import atomic_write_json, fsync_path
from l2e_dist.parallel.launcher_watch import exit_if_launcher_gone, proc_stat_field

LOCK_NAME = ".run.lock"
STALE_AFTER_BEATS = 4
LOST_LOCK_EXIT = 1
_ATTEMPTS = 8
_RETRY_S = 0.05
TAKEOVER_GUARD_STALE_S = 60.0


class RunDirectoryBusy(UserError, RuntimeError):
    """This run cannot hold its output directory: another live run does (or the lock cannot be written)."""


def _process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc), to tell a reused PID from the holder."""
    return proc_stat_field(pid, 19)


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now_ticks = _process_start_ticks(pid)
    return start_ticks is None or now_ticks is None or now_ticks == start_ticks


def _pid_namespace() -> str | None:
    """This process's PID namespace: PIDs of another one (a container sharing the host's name) are not ours
    to look up."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_process(heartbeat_s: float, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The lock record of this process, as it would hold the lock now."""
    env = os.environ if environ is None else environ
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start_ticks": _process_start_ticks(os.getpid()),
        "pid_namespace": _pid_namespace(),
        "job_id": env.get("SLURM_JOB_ID") or None,
        "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
        "started": now,
        "heartbeat": now,
        "heartbeat_s": float(heartbeat_s),
        "token": uuid.uuid4().hex,
    }


def read_lock(path: Path) -> tuple[dict[str, Any] | None, bytes | None]:
    """(record, raw bytes): (None, None) when there is no lock; (None, bytes) when it is not a lock record."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            return None, raw
        for key, kind in (("host", str), ("pid", int), ("heartbeat", (int, float)), ("token", str)):
            if not isinstance(record.get(key), kind):
                return None, raw
    except ValueError:
        return None, raw
    return record, raw


def dead_holder(holder: dict[str, Any], me: dict[str, Any], now: float) -> str | None:
    """Why `holder` no longer holds the lock (it is dead), or None when it may be alive."""
    if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        if int(holder.get("restart_count") or 0) < me["restart_count"]:
            return f"it was an earlier incarnation of this Slurm job {me['job_id']} (requeued)"
    same_pids = holder["host"] == me["host"] and holder.get("pid_namespace") == me["pid_namespace"]
    if same_pids and not _pid_alive(holder["pid"], holder.get("pid_start_ticks")):
        return f"its PID {holder['pid']} is gone from this host"
    beat_s = float(holder.get("heartbeat_s") or me["heartbeat_s"])
    age = now - float(holder["heartbeat"])
    if age > STALE_AFTER_BEATS * beat_s:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_BEATS * beat_s:g} s)"
    return None


def describe_holder(holder: dict[str, Any], now: float) -> str:
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder['host']}, PID {holder['pid']}{job}, last heartbeat {now - float(holder['heartbeat']):.0f} s ago"


def _create_exclusive(path: Path, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` iff it does not exist (link of a complete file: atomic, NFS-safe)."""
    tmp = path.with_name(f"{path.name}.new-{record['token']}")
    try:
        atomic_write_json(tmp, record)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        won = os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)
    if won:
        fsync_path(path.parent)
    return won


def _replace_dead_lock(path: Path, judged: bytes, record: dict[str, Any]) -> bool:
    """Put `record` in place of the lock judged dead, only if the file is still that very one. Takers of one
    dead lock serialize on a second file (`.run.lock.takeover`, created like the lock itself), and the swap is
    one atomic replace: a live lock is never moved aside, so no window opens in which a third run could take
    the directory while another taker believes it holds it."""
    guard = path.with_name(f"{LOCK_NAME}.takeover")
    if not _create_exclusive(guard, record):
        _clear_abandoned_guard(guard)
        return False
    try:
        _, raw = read_lock(path)
        if raw != judged:  # refreshed, released or already taken over: judge again
            return False
        atomic_write_json(path, record)
        fsync_path(path.parent)
        return True
    finally:
        guard.unlink(missing_ok=True)


def _clear_abandoned_guard(guard: Path) -> None:
    """A taker that died between creating the takeover guard and removing it (a few file operations) would block
    every later takeover: a guard older than TAKEOVER_GUARD_STALE_S is removed."""
    try:
        if time.time() - guard.stat().st_mtime > TAKEOVER_GUARD_STALE_S:
            guard.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


class RunLock:
    """The held lock of `<output_dir>/.run.lock`: a heartbeat thread keeps it fresh until `release()`."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path = path
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="l2e-run-lock", daemon=True)

    @property
    def token(self) -> str:
        return self.record["token"]

    def start_heartbeat(self) -> RunLock:
        self._thread.start()
        return self

    def refresh(self) -> None:
        """Renew the heartbeat; a lock found taken by another run ends this process (no second writer)."""
        holder, raw = read_lock(self.path)
        self.record = {**self.record, "heartbeat": time.time()}
        if raw is None:
            if _create_exclusive(self.path, self.record):
                return  # the file was deleted (by hand?) and nobody took it: ours again
            holder, raw = read_lock(self.path)
        if holder is None or holder["token"] != self.token:
            who = describe_holder(holder, time.time()) if holder else "an unreadable or foreign file"
            os.write(2, (f"rank 0: the run lock {self.path} is now held by {who}: this run stopped refreshing it "
                         "in time; exiting so that only one run writes to the directory\n").encode())
            os._exit(LOST_LOCK_EXIT)
        atomic_write_json(self.path, self.record)

    def _beat(self) -> None:
        while not self._stop.wait(self.record["heartbeat_s"]):
            try:
                self.refresh()
            except OSError as exc:  # a file-system hiccup: try again next beat, the lock is stale only after 4
                os.write(2, f"rank 0: could not refresh the run lock {self.path}: {exc}\n".encode())

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours (a rank whose launcher is gone
        exits here instead: it writes nothing more, and the lock of its dead run is taken over)."""
        exit_if_launcher_gone()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        holder, _ = read_lock(self.path)
        if holder is not None and holder["token"] == self.token:
            self.path.unlink(missing_ok=True)
            fsync_path(self.path.parent)


def acquire(output_dir: str | Path, heartbeat_s: float, log: Callable[[str], None] = print) -> RunLock:
    """Take `<output_dir>/.run.lock` (taking over a dead holder's, with a `log` line) or raise
    RunDirectoryBusy naming the live holder. The heartbeat thread is not started yet."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    me = this_process(heartbeat_s)
    for _ in range(_ATTEMPTS):
        me["started"] = me["heartbeat"] = time.time()
        if _create_exclusive(path, me):
            return RunLock(path, me)
        holder, raw = read_lock(path)
        if raw is None:
            continue  # released meanwhile: try again
        now = time.time()
        if holder is None:
            try:
                modified = path.stat().st_mtime
            except FileNotFoundError:
                continue
            age, stale_s = now - modified, STALE_AFTER_BEATS * heartbeat_s
            if age <= stale_s:
                raise RunDirectoryBusy(
                    f"train.output_dir {out} has a lock file {path} that is not a run lock (modified {age:.0f} s "
                    f"ago); if no run uses this directory delete it (it counts as stale after {stale_s:g} s), "
                    "else wait or set another train.output_dir"
                )
            reason, who = f"it is unreadable and {age:.0f} s old", "an unreadable lock file"
        else:
            reason = dead_holder(holder, me, now)
            if reason is None:
                job = holder.get("job_id")
                stop = f"scancel {job}" if job else f"kill {holder['pid']} on {holder['host']}"
                raise RunDirectoryBusy(
                    f"train.output_dir {out} is in use by another run ({describe_holder(holder, now)}; lock "
                    f"{path}): wait for it to finish, stop it ({stop}), or set another train.output_dir"
                )
            who = describe_holder(holder, now)
        if _replace_dead_lock(path, raw, me):
            log(f"l2e-dist: took over the run lock {path} from {who}: {reason}")
            return RunLock(path, me)
        time.sleep(_RETRY_S)  # another taker is swapping it: its lock is then the live one to judge
    raise RunDirectoryBusy(
        f"could not take the run lock {path}: other runs keep taking it; start one run per train.output_dir"
    )


@contextmanager
def hold_run_directory(
    output_dir: str | Path, heartbeat_s: float, rank: int, share: Callable[[Any], Any] | None = None
) -> Iterator[RunLock | None]:
    """Collective when `share` (broadcast from rank 0) is given: rank 0 takes the lock for the block, and
    every rank raises the same RunDirectoryBusy (reported once) when it cannot."""
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = acquire(output_dir, heartbeat_s)
        except RunDirectoryBusy as exc:
            refusal = str(exc)
        except OSError as exc:  # e.g. an output_dir that cannot be created: still tell every rank
            reason = environment_error_message(exc) or f"{type(exc).__name__}: {exc}"
            refusal = f"cannot take the run lock in train.output_dir {output_dir}: {reason}"
    if share is not None:
        refusal = share(refusal)
    if refusal is not None:
        error = RunDirectoryBusy(refusal)
        error.agreed = True
        raise error
    if lock is not None:
        lock.start_heartbeat()
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
