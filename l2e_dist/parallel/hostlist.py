"""Slurm hostlist and tasks-per-node expansion, in pure Python.

Why not `scontrol show hostnames`: the rank-discovery code runs inside every task and must not depend on
Slurm client tools being on the compute node's PATH (containers often lack them), and the DeepSpeed hostfile
needs the tasks-per-node string too, which scontrol does not expand.

    python -m l2e_dist.parallel.hostlist expand 'gpu-[01-02],cpu7'
    python -m l2e_dist.parallel.hostlist hostfile            # from SLURM_JOB_NODELIST / SLURM_TASKS_PER_NODE
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets ('a[1,3],b' -> ['a[1,3]', 'b'])."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    """'01-03,7' -> ['01', '02', '03', '7']; zero padding follows the width of the lower bound."""
    values: list[str] = []
    for item in body.split(","):
        low, sep, high = item.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {item!r} in hostlist {whole!r}")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in hostlist {whole!r}")
        width = len(low) if low.startswith("0") else 0
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def _expand_one(pattern: str, whole: str) -> list[str]:
    """Expand one comma-free entry; several bracket groups form a product ('r[1-2]n[1-2]')."""
    pieces = re.split(r"(\[[^\]]*\])", pattern)
    choices = [
        _expand_range_set(piece[1:-1], whole) if piece.startswith("[") else [piece]
        for piece in pieces
        if piece
    ]
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist ('n[1-3,5]', 'gpu-[01-02]', 'a1,b[2-3]') into host names, in order."""
    text = hostlist.strip()
    if not text:
        raise ValueError("empty hostlist")
    hosts: list[str] = []
    for entry in _split_top_level(text):
        if not entry:
            raise ValueError(f"empty entry in hostlist {hostlist!r}")
        hosts.extend(_expand_one(entry, hostlist))
    return hosts


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE ('2(x3),1') into one count per node ([2, 2, 2, 1])."""
    counts: list[int] = []
    for item in tasks_per_node.strip().split(","):
        match = _REPEAT.match(item.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def deepspeed_hostfile(nodelist: str, tasks_per_node: str) -> str:
    """DeepSpeed/MPI hostfile text ('n1 slots=2' per line) for a Slurm allocation."""
    hosts = expand_hostlist(nodelist)
    counts = expand_tasks_per_node(tasks_per_node)
    if len(hosts) != len(counts):
        raise ValueError(
            f"nodelist {nodelist!r} has {len(hosts)} hosts but tasks-per-node {tasks_per_node!r} "
            f"describes {len(counts)} nodes"
        )
    return "".join(f"{host} slots={count}\n" for host, count in zip(hosts, counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    expand = sub.add_parser("expand", help="print one host per line")
    expand.add_argument("hostlist")
    hostfile = sub.add_parser("hostfile", help="print a DeepSpeed hostfile for the current allocation")
    hostfile.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST"))
    hostfile.add_argument("--tasks-per-node", default=os.environ.get("SLURM_TASKS_PER_NODE"))
    args = parser.parse_args(argv)
    if args.command == "expand":
        print("\n".join(expand_hostlist(args.hostlist)))
        return 0
    if not args.nodelist or not args.tasks_per_node:
        parser.error("hostfile needs --nodelist and --tasks-per-node (or run inside a Slurm job)")
    sys.stdout.write(deepspeed_hostfile(args.nodelist, args.tasks_per_node))
    return 0


if __name__ == "__main__":
    sys.exit(main())
