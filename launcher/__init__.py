"""Thin command-line entry points; the work is in l2e_dist.

Every entry point's `main` is wrapped in `run_cli`: the one place where an error a user can cause
(l2e_dist.errors.UserError, or a full disk / missing permission) becomes one line on stderr, printed once in a
distributed run, with exit code 2. Any other exception is a bug and keeps its traceback; `--debug` or
L2E_DEBUG=1 keeps it for user errors too.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable

from l2e_dist.errors import UserError, debug_requested, environment_error_message

USER_ERROR_EXIT = 2
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def quiet_known_warnings() -> None:
    """Library noise a user can do nothing about, each filtered by its exact message (and module where it is
    known), so that every other warning still shows: megatron-core warns on every import that TE/Apex are absent
    (expected on CPU) and about a config default; DeepSpeed's ZeRO gathers call torch's deprecated
    `all_gather_into_tensor` (torch's deprecation wrapper in c10d_logger issues it, once per rank)."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        category=FutureWarning,
        module=r"torch\.distributed\.c10d_logger",
    )


def dotted_overrides(argv: list[str] | None) -> list[str]:
    """The litgpt / torchtitan spelling of a config override: `--train.seed=7` or `--train.seed 7` becomes
    `--set train.seed=7` (any flag whose name holds a dot), so an unknown key is still named by the config."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    while args:
        arg = args.pop(0)
        if arg == "--":
            out += [arg, *args]
            break
        flag, equals, value = arg.partition("=")
        name = flag[2:]
        if not (flag.startswith("--") and "." in name and name[:1].isalpha()):
            out.append(arg)
            continue
        if not equals and args and not args[0].startswith("--"):
            value, equals = args.pop(0), "="
        out += ["--set", f"{name}{equals}{value}"]  # no value: the config names the malformed override
    return out


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: L2E_DEBUG=1)"
    )


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched distributed)."""
    for name in _RANK_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report_user_error(prog: str, message: str, agreed: bool = True) -> None:
    """Print one line: on rank 0 only when every rank has the same error, else on each rank that has it."""
    rank = process_rank()
    if rank != 0 and agreed:
        return
    where = f"[rank {rank}] " if rank != 0 else ""
    print(f"{prog}: error: {where}{' '.join(message.split())}", file=sys.stderr, flush=True)


def run_cli(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for an entry point `main(argv=None) -> int` (see the module docstring)."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            args = sys.argv[1:] if argv is None else argv
            debug = "--debug" in args or debug_requested()
            try:
                return main(argv)
            except UserError as exc:
                if debug:
                    raise
                report_user_error(prog, str(exc), agreed=exc.agreed)
            except (OSError, RuntimeError) as exc:
                message = environment_error_message(exc)
                if message is None or debug:
                    raise
                report_user_error(prog, message, agreed=False)
            return USER_ERROR_EXIT

        return run

    return decorate
