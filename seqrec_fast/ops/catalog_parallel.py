"""Catalog (item-table) parallelism: the distributed primitives the sharded losses and the
models build on.

The catalog of N items is split by rows into contiguous shards in rank order: rank r of a
process group of size W holds items ``[offset_r, offset_r + n_r)`` with
``offset_r = n_0 + ... + n_{r-1}`` (:func:`shard_rows` gives the default even split; any sizes
work, each rank passes its own ``items`` shard and the sizes are exchanged). The user vectors,
the targets and the negatives are REPLICATED: identical on every rank of the group (all-gather
them first when each rank holds its own users, :func:`gather_batch`). The losses over a sharded
catalog live with their ops and import this module (never the reverse):
``linear_cross_entropy_sharded`` in ``seqrec_fast.ops.linear_cross_entropy`` and
``sampled_softmax_sharded`` in ``seqrec_fast.ops.sampled_softmax``. Their loss is replicated
too, and the gradients are those of the single-process op: ``user`` gets its full gradient on
every rank, ``items`` / ``bias`` the rows of the rank's own shard. No rank ever holds the whole
catalog or a (B, N) logits tensor.

Here: :func:`all_gather_list`, :func:`shard_rows`, :func:`check_group`,
:func:`exchange_shard_offset` (shard offsets plus a check that the replicated inputs agree),
the autograd-aware collectives of the replicated setting (:func:`copy_to_shards`,
:func:`gather_replicated`, :func:`sum_replicated`), :func:`gather_batch` and
:func:`sharded_embedding` (embedding lookup from a table split by rows, data-parallel ids).

Collectives (torch.distributed, any backend: gloo on CPU, nccl on GPU) are wrapped in autograd
functions for this replicated setting. Each loss call also exchanges a few scalars per rank
(batch size, dim, shard size, a checksum of the replicated inputs): that is how a shard's offset
is found and how inputs that are not identical across ranks get a ValueError instead of a wrong
loss. Not traceable by ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    return dist


def all_gather_list(x: Tensor, group, world: int) -> list:
    """torch.distributed.all_gather into a fresh list of ``world`` tensors shaped like ``x``."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    _dist().all_gather(parts, x, group=group)
    return parts


def shard_rows(n_items: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Default contiguous split of ``n_items`` rows over ``world_size`` ranks: -> (start, stop)
    of ``rank``'s shard; the first ``n_items % world_size`` ranks get one row more."""
    for name, v in (("n_items", n_items), ("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n_items < world_size:
        raise ValueError(f"n_items={n_items} cannot be split into {world_size} non-empty shards")
    base, extra = divmod(n_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_group(process_group):
    """-> (group, rank, world_size) for ``process_group``: a ProcessGroup, or ``"default"``
    (the default group, returned as None as torch.distributed takes it). ValueError when
    torch.distributed is not initialized or this process is not in the group."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    group = None if isinstance(process_group, str) and process_group == "default" else process_group
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or 'default', "
                        f"got {type(process_group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    return group, rank, dist.get_world_size(group)


# ----------------------------------------------------------------------------------------------
# collectives for replicated computations (autograd)
# ----------------------------------------------------------------------------------------------
def _collective_dtype(t: Tensor) -> torch.dtype:
    """fp32/fp64 travel as they are; half types as fp32 on every backend and device: gloo
    reduces no bf16, and a sum of several ranks' half gradients rounded in half precision would
    differ from the fp32 sum the CPU (gloo) tests check (copies of half values are exact)."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


class _CopyToShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group. For an input that every
    rank holds identically and uses for its own shard's share of a replicated loss."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        g = grad.to(_collective_dtype(grad)).contiguous().clone()
        _dist().all_reduce(g, group=ctx.group)
        return g.to(grad.dtype), None


class _GatherReplicated(torch.autograd.Function):
    """(P...) per rank -> (W, P...) on every rank. The consumer is replicated, so each rank's
    gradient for its own slot is already complete: backward takes it, no communication."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.rank = rank
        return torch.stack(all_gather_list(x, group, world))

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None, None


class _SumReplicated(torch.autograd.Function):
    """All-reduce sum whose result feeds a replicated computation: backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.to(_collective_dtype(x)).contiguous().clone()
        _dist().all_reduce(y, group=group)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_shards(x: Tensor, group) -> Tensor:
    """Identity whose backward all-reduces (sums) the gradient over ``group``."""
    return _CopyToShards.apply(x, group)


def gather_replicated(x: Tensor, group, rank: int, world: int) -> Tensor:
    """(P...) per rank -> (W, P...) on every rank, for a replicated consumer."""
    return _GatherReplicated.apply(x, group, rank, world)


def sum_replicated(x: Tensor, group) -> Tensor:
    """All-reduce sum for a replicated consumer (backward: the identity)."""
    return _SumReplicated.apply(x, group)


# ----------------------------------------------------------------------------------------------
# shard bookkeeping and input agreement
# ----------------------------------------------------------------------------------------------
def _checksum(t: Optional[Tensor]) -> float:
    if t is None:
        return 0.0
    if not t.is_floating_point():
        t = t.reshape(-1)
        w = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64)
        return float(((t * w) % 1000003).sum().item() % 1000003)
    return float(t.detach().double().nan_to_num(nan=7.25, posinf=3.5, neginf=-3.5).sum())


def exchange_shard_offset(group, rank, world, device, n_local: int, user: Tensor,
                          *replicated) -> tuple:
    """All-gather (B, d, n_r, checksums of ``user`` and ``replicated``...) -> (offset of this
    rank's shard, N the catalog size); ValueError when the replicated inputs (``user``, then
    target, negatives, log_q, target_log_q in that order) differ between ranks."""
    dist = _dist()
    vals = [float(user.shape[0]), float(user.shape[1]), float(n_local), _checksum(user)]
    vals += [_checksum(t) for t in replicated]
    mine = torch.tensor(vals, dtype=torch.float64,
                        device=device if dist.get_backend(group) == "nccl" else "cpu")
    rows = [p.tolist() for p in all_gather_list(mine, group, world)]
    names = ["batch size", "dim", None, "user values"] + [
        "target", "negatives", "log_q", "target_log_q"][:len(replicated)]
    for i, name in enumerate(names):
        if name is None:
            continue
        if any(r[i] != rows[0][i] for r in rows):
            raise ValueError(
                f"with process_group, user/target/negatives must be identical on every rank "
                f"(the catalog is sharded, the batch is replicated): the {name} differs between "
                f"ranks ({[r[i] for r in rows]}); all-gather the batch before the loss")
    sizes = [int(r[2]) for r in rows]
    return sum(sizes[:rank]), sum(sizes)


# ----------------------------------------------------------------------------------------------
# data-parallel rows into a replicated computation
# ----------------------------------------------------------------------------------------------
class _GatherBatch(torch.autograd.Function):
    """Concatenate every rank's (B, ...) rows in rank order. The result feeds a replicated
    computation: backward keeps this rank's rows of the (identical) gradient, times
    ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, group, rank, world, grad_scale):
        ctx.args = (rank, x.shape[0], grad_scale)
        return torch.cat(all_gather_list(x, group, world))

    @staticmethod
    def backward(ctx, grad):
        rank, b, scale = ctx.args
        g = grad[rank * b:(rank + 1) * b]
        return (g * scale if scale != 1.0 else g), None, None, None, None


def gather_batch(x: Tensor, process_group, *, grad_scale: float = 1.0) -> Tensor:
    """(B, ...) per rank -> (W·B, ...) on every rank (rank order); every rank must pass the same
    shape. For data-parallel rows entering a replicated loss: x's gradient is its rows of the
    replicated gradient times ``grad_scale`` (W undoes DistributedDataParallel's averaging)."""
    group, rank, world = check_group(process_group)
    dist = _dist()
    shape = torch.tensor(list(x.shape), dtype=torch.int64,
                         device=x.device if dist.get_backend(group) == "nccl" else "cpu")
    shapes = all_gather_list(shape, group, world)
    if any(not torch.equal(t, shapes[0]) for t in shapes):
        raise ValueError(f"gather_batch needs the same shape on every rank, got "
                         f"{[tuple(t.tolist()) for t in shapes]}")
    if not x.is_floating_point():
        return torch.cat(all_gather_list(x, group, world))
    return _GatherBatch.apply(x, group, rank, world, float(grad_scale))


# ----------------------------------------------------------------------------------------------
# embedding lookup from a sharded table (data-parallel ids)
# ----------------------------------------------------------------------------------------------
class _ShardedLookup(torch.autograd.Function):
    """Each rank looks up ITS OWN ids (data parallel) in a table split by rows across ranks.

    forward: all-gather every rank's ids, take their U distinct values, each rank fills the
    rows it owns, one all-reduce of the (U, d) table, then each rank reads its ids from it.
    backward: each rank scatters its output gradient into (U, d), one all-reduce sums the
    ranks', and each rank keeps its own rows (times ``grad_scale``)."""

    @staticmethod
    def forward(ctx, shard, ids, group, rank, world, offset, grad_scale, sparse_grad):
        dist = _dist()
        flat = ids.reshape(-1)
        n = torch.tensor([flat.numel()], dtype=torch.int64, device=flat.device)
        sizes = [int(x.item()) for x in all_gather_list(n, group, world)]
        m = max(sizes)
        padded = torch.full((m,), -1, dtype=torch.int64, device=flat.device)
        padded[:flat.numel()] = flat
        parts = all_gather_list(padded, group, world)
        every = torch.cat([p[:k] for p, k in zip(parts, sizes)])
        uniq, inv = torch.unique(every, return_inverse=True)
        start = sum(sizes[:rank])
        mine = inv[start:start + sizes[rank]]
        n_local = shard.shape[0]
        owned = (uniq >= offset) & (uniq < offset + n_local)
        loc = (uniq - offset).clamp(0, n_local - 1)
        rows = torch.where(owned[:, None], shard[loc], torch.zeros((), dtype=shard.dtype,
                                                                   device=shard.device))
        cd = _collective_dtype(rows)
        table = rows.to(cd).contiguous()
        dist.all_reduce(table, group=group)
        ctx.save_for_backward(mine, owned, loc)
        ctx.args = (group, grad_scale, sparse_grad, uniq.numel(), tuple(shard.shape))
        return table.to(shard.dtype)[mine].reshape(*ids.shape, shard.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        mine, owned, loc = ctx.saved_tensors
        group, grad_scale, sparse_grad, U, shape = ctx.args
        d = shape[1]
        g = grad.reshape(-1, d)
        cd = _collective_dtype(g)
        gt = torch.zeros((U, d), dtype=cd, device=g.device).index_add_(0, mine, g.to(cd))
        _dist().all_reduce(gt, group=group)
        if grad_scale != 1.0:
            gt = gt * grad_scale
        gt = gt.to(grad.dtype)
        if sparse_grad:
            out = torch.sparse_coo_tensor(loc[owned][None], gt[owned], shape)
        else:
            out = gt.new_zeros(shape).index_add_(0, loc[owned], gt[owned])
        return out, None, None, None, None, None, None, None


def sharded_embedding(ids: Tensor, shard: Tensor, process_group, *, offset: Optional[int] = None,
                      grad_scale: float = 1.0, sparse_grad: bool = False) -> Tensor:
    """Embedding lookup in an item table split by rows across ranks, each rank with its own ids.

    ids: (...) int64 global ids (any shape; the shapes may differ between ranks); shard:
    (n_r, d) this rank's rows ``[offset, offset + n_r)`` (``offset`` None: found by exchanging
    the shard sizes, contiguous in rank order). -> (..., d) rows of the whole table.
    Every rank must call it (it is collective). The shard's gradient is the sum over ranks of
    each rank's output gradient for the rows it owns, times ``grad_scale`` (pass 1/W to match
    DistributedDataParallel's gradient averaging); ``sparse_grad`` returns it as a sparse COO
    tensor of the touched rows (for row-wise optimizers). Communication: the ids (all-gather)
    and one (U, d) all-reduce each way, U = distinct ids over all ranks.
    """
    group, rank, world = check_group(process_group)
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64:
        raise TypeError(f"ids must be an int64 tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if not isinstance(shard, Tensor) or shard.dim() != 2:
        raise ValueError(f"shard must be a (n_rows, d) tensor, got "
                         f"{getattr(shard, 'shape', type(shard).__name__)}")
    if ids.device != shard.device:
        raise ValueError(f"ids are on {ids.device} but shard is on {shard.device}")
    if offset is None:
        n = torch.tensor([shard.shape[0]], dtype=torch.int64, device=shard.device)
        sizes = all_gather_list(n, group, world)
        offset = int(sum(int(x.item()) for x in sizes[:rank]))
    return _ShardedLookup.apply(shard, ids, group, rank, world, int(offset), float(grad_scale),
                                bool(sparse_grad))


__all__ = ["shard_rows", "check_group", "all_gather_list", "exchange_shard_offset",
           "copy_to_shards", "gather_replicated", "sum_replicated", "sharded_embedding",
           "gather_batch"]
