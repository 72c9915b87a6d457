"""Multi-process helpers on torch.distributed: catalog sharding and data-parallel training.

``seqrec-fast train`` under ``torchrun --nproc_per_node N`` (or a Python process that has
already called ``torch.distributed.init_process_group``) trains with DistributedDataParallel;
see README "Scaling to several GPUs". :func:`shard_rows` is the row split the catalog-sharded
losses (``process_group=`` of ``linear_cross_entropy`` / ``sampled_softmax_loss``) expect.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .ops.catalog_parallel import (check_group, gather_batch, shard_rows,  # noqa: F401
                                    sharded_embedding)

log = logging.getLogger("seqrec_fast.distributed")


@dataclass
class DistContext:
    """Where this process stands: rank / world_size of the default group (0 / 1 when not
    distributed), local_rank (GPU index on its node), and whether :func:`setup` created the
    group (then :func:`teardown` destroys it)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self, device: Optional[torch.device] = None) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.get_backend() == "nccl" and device is not None and device.type == "cuda":
                dist.barrier(device_ids=[device.index or 0])
            else:
                dist.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """All-reduced mean of a per-rank float (the value itself when not distributed)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64,
                         device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; any other name as torch.device takes it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(device: str = "auto", timeout_s: float = 600.0):
    """-> (DistContext, torch.device).

    Joins the default process group when it is already initialized; else initializes one from
    torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) with nccl for CUDA and gloo for CPU (``SEQREC_FAST_DIST_BACKEND=gloo``
    forces gloo, e.g. to run two ranks on one GPU); else single process. ``device``:
    "auto" | "cpu" | "cuda" | "cuda:i"; in a distributed CUDA run each rank takes
    ``cuda:<local_rank>``. ``timeout_s`` bounds how long a collective waits for a rank that has
    stopped answering.
    """
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
    dev = resolve_device(device)
    import torch.distributed as dist

    available = dist.is_available()
    world = _env_int("WORLD_SIZE", 1)
    if available and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(),
                          _env_int("LOCAL_RANK", dist.get_rank()), owns_group=False)
    elif world > 1:
        if not available:
            raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no "
                               "torch.distributed")
        backend = os.environ.get("SEQREC_FAST_DIST_BACKEND") or (
            "nccl" if dev.type == "cuda" else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"SEQREC_FAST_DIST_BACKEND must be 'nccl' or 'gloo', got {backend!r}")
        local = _env_int("LOCAL_RANK", 0)
        if dev.type == "cuda":
            torch.cuda.set_device(_gpu_of(local))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
        log.info("rank %d/%d: process group initialized (%s)", ctx.rank, ctx.world_size,
                 backend)
    else:
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)     # cuda:i in one process: its default device too
        return DistContext(), dev
    if dev.type == "cuda" and ctx.enabled:
        dev = torch.device("cuda", _gpu_of(ctx.local_rank))
        torch.cuda.set_device(dev)
    return ctx, dev


def _gpu_of(local_rank: int) -> int:
    """The GPU of a local rank: its own index; with fewer GPUs than ranks they share round-robin
    (only gloo can run that; nccl refuses two ranks on one GPU with its own error)."""
    n = torch.cuda.device_count()
    return local_rank % n if n else local_rank


def teardown(ctx: DistContext) -> None:
    """Destroy the process group when :func:`setup` created it."""
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer rank vanished or timed out."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover - old torch
        DistError = ()  # noqa: N806
    if DistError and isinstance(exc, DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("connection closed", "connection reset", "broken pipe", "timed out",
                            "gloo", "nccl", "socket"))


__all__ = ["DistContext", "setup", "teardown", "shard_rows", "check_group", "sharded_embedding",
           "gather_batch",
           "is_collective_failure"]
