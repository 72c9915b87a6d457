"""Catalog (item-table) parallelism for the softmax losses.

The catalog of N items is split by rows into contiguous shards in rank order: rank r of a
process group of size W holds items ``[offset_r, offset_r + n_r)`` with
``offset_r = n_0 + ... + n_{r-1}`` (:func:`shard_rows` gives the default even split; any sizes
work, each rank passes its own ``items`` shard and the sizes are exchanged). The user vectors,
the targets and the negatives are REPLICATED: identical on every rank of the group (all-gather
them first when each rank holds its own users). The loss is replicated too, and the gradients
are those of the single-process op: ``user`` gets its full gradient on every rank, ``items`` /
``bias`` the rows of the rank's own shard. No rank ever holds the whole catalog or a (B, N)
logits tensor.

* ``linear_cross_entropy`` (vocabulary-parallel cross-entropy, as Megatron-LM does for
  vocabularies): each rank computes the log-sum-exp of its shard with the fused kernel, the
  target logit when it owns the target, and (label smoothing) the sum of its logits; one
  all-gather of these (W, 3, B) values combines them. Backward: the fused kernel's shard
  gradient, scaled by exp(lse_r - lse); the user gradient is all-reduced (B·d values).
* ``sampled_softmax_loss``: the candidates (targets and negatives, at most B + S distinct ids)
  are what a step touches, so each rank contributes the candidate rows it owns and one
  all-reduce of that (U, d) table (U distinct candidate ids) gives every rank the same
  candidate table; the single-process fused op then runs on it unchanged (duplicates,
  accidental hits, in-batch negatives and logQ exactly as without a group) and the backward
  needs no communication.

Collectives (torch.distributed, any backend: gloo on CPU, nccl on GPU) are wrapped in autograd
functions for this replicated setting. Each call also exchanges a few scalars per rank (batch
size, dim, shard size, a checksum of the replicated inputs): that is how a shard's offset is
found and how inputs that are not identical across ranks get a ValueError instead of a wrong
loss. Not traceable by ``torch.compile``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    return dist


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
    """-> (rank, world_size) of ``process_group`` (``"default"`` = the default group)."""
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
    # gloo reduces fp32/fp64 everywhere; half types travel as fp32 (exact: values are copied)
    return t.dtype if t.dtype in (torch.float32, torch.float64) or t.is_cuda else torch.float32


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
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        _dist().all_gather(parts, x, group=group)
        return torch.stack(parts)

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


def _exchange(group, rank, world, device, n_local: int, user: Tensor, *replicated) -> tuple:
    """All-gather (B, d, n_r, checksums...) -> (offset, N); ValueError when the replicated
    inputs differ between ranks."""
    dist = _dist()
    vals = [float(user.shape[0]), float(user.shape[1]), float(n_local), _checksum(user)]
    vals += [_checksum(t) for t in replicated]
    mine = torch.tensor(vals, dtype=torch.float64,
                        device=device if dist.get_backend(group) == "nccl" else "cpu")
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    rows = [p.tolist() for p in parts]
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
# full-catalog cross-entropy over a sharded catalog
# ----------------------------------------------------------------------------------------------
class _ShardLSE(torch.autograd.Function):
    """lse_r (B,) = log Σ_{j in shard} exp((u·w_j + b_j)/T) with the fused kernels.

    The kernels compute loss rows lse - z_target; they are called with target 0 for every row
    and the target term is added back in backward (a (B, d) correction)."""

    @staticmethod
    def forward(ctx, user, items, bias, temperature, backend, need_user_grad):
        from .softmax import _lce_fwd_op

        tgt = torch.zeros(user.shape[0], dtype=torch.int64, device=user.device)
        _, lse, udir = _lce_fwd_op(user, items, tgt, bias, temperature, -100, 0.0,
                                   need_user_grad, backend)
        ctx.save_for_backward(user, items, tgt, bias, lse, udir)
        ctx.args = (temperature, backend)
        return lse

    @staticmethod
    def backward(ctx, g):
        from .softmax import _lce_bwd_op

        user, items, tgt, bias, lse, udir = ctx.saved_tensors
        temperature, backend = ctx.args
        nu, nw, nb = ctx.needs_input_grad[:3]
        if not (nu or nw or nb):
            return (None,) * 6
        g = g.to(lse.dtype).contiguous()
        du, dw, db = _lce_bwd_op(g, user, items, tgt, bias, lse, udir, temperature, -100, 0.0,
                                 nu, nw, bool(nb and bias is not None), backend)
        gs = g / temperature                                   # d(-z_0)/d(...) added back
        out_u = out_w = out_b = None
        if nu:
            out_u = (du.to(gs.dtype) + gs[:, None] * items[0].to(gs.dtype)).to(user.dtype)
        if nw:
            dw = dw.to(gs.dtype)
            dw[0] += (gs[:, None] * user.to(gs.dtype)).sum(0)
            out_w = dw.to(items.dtype)
        if nb and bias is not None:
            db = db.to(gs.dtype)
            db[0] += gs.sum()
            out_b = db.to(bias.dtype)
        return out_u, out_w, out_b, None, None, None


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_cross_entropy_sharded(user, items, target, bias, temperature, ignore_index, reduction,
                                 label_smoothing, return_lse, backend, process_group):
    """Arguments as ``linear_cross_entropy`` (validated there, except the id range); ``items``
    (n_r, d) and ``bias`` (n_r,) are this rank's shard."""
    from . import softmax as S

    group, rank, world = check_group(process_group)
    device = user.device
    n_local = items.shape[0]
    offset, N = _exchange(group, rank, world, device, n_local, user, target)
    if 0 <= ignore_index < N:
        raise ValueError(f"ignore_index={ignore_index} is a valid item id in [0, {N}); "
                         "use a negative value")
    S._check_range("target", target, N, allowed=ignore_index)
    be = S._resolve(S.OP_LCE, backend, device, user.dtype)
    acc = _acc(user.dtype)
    u = _CopyToShards.apply(user, group)
    if be == "eager":
        logits = u.to(acc) @ items.to(acc).t()
        if bias is not None:
            logits = logits + bias.to(acc)
        lse_r = torch.logsumexp(logits / temperature, dim=1)
    else:
        need_user_grad = torch.is_grad_enabled() and user.requires_grad
        lse_r = _ShardLSE.apply(u, items, bias, temperature, be, need_user_grad)
        lse_r = lse_r.to(acc)
    owned = (target >= offset) & (target < offset + n_local)
    loc = (target - offset).clamp(0, n_local - 1)
    z = (u.to(acc) * items[loc].to(acc)).sum(-1)
    if bias is not None:
        z = z + bias[loc].to(acc)
    z_loc = torch.where(owned, z / temperature, torch.zeros_like(z))
    parts = [lse_r, z_loc]
    if label_smoothing > 0:
        tot = u.to(acc) @ items.to(acc).sum(0)
        if bias is not None:
            tot = tot + bias.to(acc).sum()
        parts.append(tot / temperature)
    G = _GatherReplicated.apply(torch.stack(parts), group, rank, world)   # (W, P, B)
    lse = torch.logsumexp(G[:, 0], dim=0)
    rows = lse - (1.0 - label_smoothing) * G[:, 1].sum(0)
    if label_smoothing > 0:
        rows = rows - (label_smoothing / N) * G[:, 2].sum(0)
    valid = target != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    count = valid.sum() if reduction == "mean" else None
    loss = S._reduce(rows, reduction, count, user.dtype)
    return (loss, lse.detach()) if return_lse else loss


# ----------------------------------------------------------------------------------------------
# sampled softmax over a sharded catalog
# ----------------------------------------------------------------------------------------------
def sampled_softmax_sharded(user, items, target, negatives, log_q, target_log_q,
                            in_batch_negatives, remove_accidental_hits, temperature, reduction,
                            backend, process_group):
    """Arguments as ``sampled_softmax_loss`` (validated there, except the id range)."""
    from . import softmax as S

    group, rank, world = check_group(process_group)
    device = user.device
    n_local = items.shape[0]
    offset, N = _exchange(group, rank, world, device, n_local, user, target, negatives, log_q,
                          target_log_q)
    S._check_range("target", target, N)
    S._check_range("negatives", negatives, N)
    B = target.shape[0]
    uniq, inv = torch.unique(torch.cat([target, negatives.reshape(-1)]), return_inverse=True)
    owned = (uniq >= offset) & (uniq < offset + n_local)
    loc = (uniq - offset).clamp(0, n_local - 1)
    mine = torch.where(owned[:, None], items[loc], torch.zeros((), dtype=items.dtype,
                                                               device=device))
    table = _SumReplicated.apply(mine, group)                       # (U, d), every rank
    return S.sampled_softmax_loss(user, table, inv[:B], inv[B:].reshape(negatives.shape),
                                  log_q=log_q, target_log_q=target_log_q,
                                  in_batch_negatives=in_batch_negatives,
                                  remove_accidental_hits=remove_accidental_hits,
                                  temperature=temperature, reduction=reduction, backend=backend)


__all__ = ["shard_rows", "check_group", "linear_cross_entropy_sharded",
           "sampled_softmax_sharded"]
