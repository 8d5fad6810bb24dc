"""Counting torch.distributed collectives by caller: how the benchmark and the tests check what a step costs in
communication (L2E promises one fused all_reduce per optimizer step)."""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from typing import Any

import torch.distributed as dist

_COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "all_gather_object", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single", "barrier", "gather",
    "scatter", "send", "recv", "isend", "irecv", "batch_isend_irecv",
)


class CollectiveCounter:
    """Counts torch.distributed collective calls while active, by caller: the first frame outside
    torch.distributed and deepspeed.comm decides the source (l2e, deepspeed, megatron or other).
    Nested calls (one collective implemented by another) count once."""

    _SKIP = (os.sep + os.path.join("torch", "distributed") + os.sep, os.sep + os.path.join("deepspeed", "comm") + os.sep)
    _SOURCES = (
        (os.sep + os.path.join("l2e_dist", "l2e") + os.sep, "l2e"),
        (os.sep + "deepspeed" + os.sep, "deepspeed"),
        (os.sep + "megatron" + os.sep, "megatron"),
    )

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> CollectiveCounter:
        from torch.distributed import distributed_c10d

        originals: dict[int, Any] = {}
        for module in (dist, distributed_c10d):
            for name in _COLLECTIVES:
                fn = getattr(module, name, None)
                if fn is None:
                    continue
                wrapped = originals.setdefault(id(fn), self._wrap(fn, name))
                self._saved.append((module, name, fn))
                setattr(module, name, wrapped)
        backend = self._deepspeed_backend()
        for name in ("all_gather_function", "reduce_scatter_function"):
            fn = getattr(backend, name, None) if backend is not None else None
            if fn is not None:
                self._saved.append((backend, name, fn))
                setattr(backend, name, originals.get(id(fn)) or self._wrap(fn, name))
        return self

    def ops(self) -> dict[str, int]:
        """Calls per collective (e.g. {"all_reduce": 2}), whoever the caller."""
        return {key[3:]: n for key, n in self.counts.items() if key.startswith("op:")}

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    @staticmethod
    def _deepspeed_backend():
        module = sys.modules.get("deepspeed.comm.comm")
        return getattr(module, "cdb", None) if module is not None else None

    def _wrap(self, fn, name: str):
        def counted(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self.counts[self._source()] += 1
                self.counts["total"] += 1
                self.counts["op:" + name.lstrip("_")] += 1
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        return counted

    def _source(self) -> str:
        frame = sys._getframe(2)
        while frame is not None and any(s in frame.f_code.co_filename for s in self._SKIP):
            frame = frame.f_back
        filename = frame.f_code.co_filename if frame is not None else ""
        return next((source for marker, source in self._SOURCES if marker in filename), "other")
