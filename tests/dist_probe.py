"""A tiny torch.distributed (gloo) program standing in for the trainer in launch tests.

It uses the same pieces the trainer uses: rank discovery, init with a timeout, PreemptionHandler
(checkpoint on every rank, barrier, requeue, automatic resume from <output_dir>/checkpoints/latest) and the
watchdog. It trains a 2-layer MLP data-parallel on data that depends only on (step, rank), so an
interrupted-and-resumed run must end with exactly the loss of an uninterrupted one.

    python tests/dist_probe.py --steps 20 --output-dir /tmp/run      # under srun, torchrun, mpirun, deepspeed
    ... --fail-rank 1 --fail-step 5 --fail-how kill|stop              # make one rank die or freeze
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from l2e_dist.parallel.launch_env import discover_distributed_env
from l2e_dist.training.preemption import PreemptionHandler, start_watchdog

EXIT_STOPPED_NOT_REQUEUED = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint, resubmit to resume


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: rendezvous check only)")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument(
        "--step-sleep", type=float, default=0.0, help="seconds per step, to leave time to signal"
    )
    parser.add_argument("--check-every", type=int, default=2)
    parser.add_argument("--dist-timeout-s", type=float, default=300.0)
    parser.add_argument("--watchdog-s", type=float, default=0.0, help="0: no watchdog")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=-1)
    parser.add_argument("--fail-how", choices=["kill", "stop"], default="kill")
    return parser.parse_args(argv)


def save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:
        torch.save(obj, handle)
    os.replace(handle.name, path)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    inputs = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    return inputs, inputs.sum(dim=1, keepdim=True).sin()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = discover_distributed_env()
    print(f"probe: {env.describe()} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.dist_timeout_s))
    assert dist.get_rank() == env.rank and dist.get_world_size() == env.world_size
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    if env.rank == 0:
        print(f"probe: world_size {env.world_size} allreduce sum {total.item():.0f}", flush=True)
    if args.steps == 0:
        dist.destroy_process_group()
        return 0

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    checkpoints = args.output_dir / "checkpoints"
    start = 0
    if (checkpoints / "latest").exists():
        tag = (checkpoints / "latest").read_text().strip()
        state = torch.load(checkpoints / tag / f"rank_{env.rank}.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"probe: rank {env.rank} resumed from {tag} (step {start})", flush=True)

    preemption = PreemptionHandler(check_every=args.check_every)
    preemption.install()
    watchdog = start_watchdog(args.watchdog_s) if args.watchdog_s > 0 else None
    loss = torch.zeros(())
    for step in range(start + 1, args.steps + 1):
        if env.rank == args.fail_rank and step == args.fail_step:
            print(
                f"probe: rank {env.rank} failing ({args.fail_how}) at step {step} time {time.time():.3f}",
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGKILL if args.fail_how == "kill" else signal.SIGSTOP)
        inputs, targets = batch(step, env.rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= env.world_size
        optimizer.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= env.world_size
        if env.rank == 0:
            print(f"probe: step {step} loss {loss.item():.6f}", flush=True)
        if watchdog:
            watchdog.heartbeat(step)
        time.sleep(args.step_sleep)
        if preemption.should_stop(step=step):
            tag = f"step_{step}"
            save_atomic(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                checkpoints / tag / f"rank_{env.rank}.pt",
            )
            dist.barrier()
            if env.rank == 0:
                (checkpoints / ".latest.tmp").write_text(tag)
                os.replace(checkpoints / ".latest.tmp", checkpoints / "latest")
            dist.barrier()
            requeued = preemption.requeue()
            if env.rank == 0:
                print(
                    f"probe: stopped at step {step} on {preemption.received}; requeued={requeued}", flush=True
                )
            if watchdog:
                watchdog.stop()
            dist.destroy_process_group()
            return 0 if requeued or env.rank != 0 else EXIT_STOPPED_NOT_REQUEUED
    if watchdog:
        watchdog.stop()
    if env.rank == 0:
        print(f"final loss {loss.item()!r}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
