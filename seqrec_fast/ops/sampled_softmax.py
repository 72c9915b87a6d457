"""Sampled losses: ``sampled_softmax_loss`` (shared / per-row negatives, in-batch negatives,
logQ correction, accidental-hit removal), also over a catalog sharded across a process group
(``sampled_softmax_sharded``), and GRU4Rec's ``bpr_max_loss`` (eager composite over the same
candidates).

Structure (DESIGN.md): custom ops ``seqrec_fast::sampled_softmax_fwd/_bwd`` return per-row losses
(fp32, fp64 for fp64 inputs) and the backward state; the reduction is ordinary torch on a (B,)
vector. Saved for backward: the inputs, lse (B,) and — Triton only — the softmax-weighted item
mean (B, d) = Σ_c softmax_c·item_c over the candidates, so that the user gradient is a (B, d)
epilogue. Never a (B, S, d) tensor.

Backends: ``triton`` (``seqrec_fast.kernels.sampled_softmax``), ``cpp``
(``csrc/sampled_softmax``: chunked over the candidates, float64 capable), ``eager``
(``sampled_softmax_ref``). float64 on CUDA runs eager.

Non-finite inputs, the same on every backend: a ``log_q`` of -inf (probability 0) makes that
candidate's corrected logit +inf, so the loss of every row that sees it is +inf and the
gradients of those rows are NaN (inf - inf), as in the eager formula. Extreme temperatures
(1e-30) give finite losses and gradients (probabilities clamped to <= 1). Id checks (range
of ``target`` / ``negatives``): ValueError on CPU, compiled or not
(``seqrec_fast::check_id_range``); on CUDA a device-side assert without host sync.

Sharded catalog (collectives in ``catalog_parallel``): the candidates (targets and negatives, at
most B + S distinct ids) are what a step touches, so each rank contributes the candidate rows it
owns and one all-reduce of that (U, d) table (U distinct candidate ids) gives every rank the
same candidate table; the single-process fused op then runs on it unchanged (duplicates,
accidental hits, in-batch negatives and logQ exactly as without a group) and the backward needs
no communication.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from ..reference.sampled_softmax import bpr_max_ref, sampled_softmax_ref
from ._common import (FLOATS, REDUCTIONS, acc_dtype, autocast_inputs, check_bool,
                      check_float_scalar, check_ids, check_range, check_user_items, compiling,
                      deferred_error, loss_fwd_fake, on_input_device, reduce_rows,
                      resolve_loss_backend)
from .catalog_parallel import check_group, exchange_shard_offset, sum_replicated

OP = "sampled_softmax"


def _triton():
    from seqrec_fast.kernels import sampled_softmax as k

    return k


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("seqrec_fast::sampled_softmax_fwd", mutates_args=())
@on_input_device
def _sampled_softmax_fwd_op(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor,
                            log_q: Optional[Tensor], target_log_q: Optional[Tensor],
                            in_batch_negatives: bool, remove_accidental_hits: bool,
                            temperature: float, need_user_grad: bool,
                            backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> loss_rows (B,), lse (B,) (fp32 / fp64), softmax_item_mean (B, d) fp32 (triton) |
    (0, d)."""
    if backend == "cpp":
        loss, lse = _ext._C.sampled_softmax_fwd_cpu(user, items, target, negatives, log_q,
                                                    target_log_q, in_batch_negatives,
                                                    remove_accidental_hits, temperature)
        return loss, lse, user.new_empty((0, user.shape[1]), dtype=loss.dtype)
    if backend == "triton":
        return _triton()._sampled_softmax_fwd(user, items, target, negatives, log_q,
                                              target_log_q, in_batch_negatives,
                                              remove_accidental_hits, temperature,
                                              need_user_grad)
    raise ValueError(f"no fused sampled_softmax kernel for backend {backend!r}")


@_sampled_softmax_fwd_op.register_fake
def _(user, items, target, negatives, log_q, target_log_q, in_batch_negatives,
      remove_accidental_hits, temperature, need_user_grad, backend):
    return loss_fwd_fake(user, need_user_grad, backend)


@torch.library.custom_op("seqrec_fast::sampled_softmax_bwd", mutates_args=())
@on_input_device
def _sampled_softmax_bwd_op(grad_rows: Tensor, user: Tensor, items: Tensor, target: Tensor,
                            negatives: Tensor, log_q: Optional[Tensor],
                            target_log_q: Optional[Tensor], lse: Tensor,
                            softmax_item_mean: Tensor, in_batch_negatives: bool,
                            remove_accidental_hits: bool, temperature: float, need_user: bool,
                            need_items: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """-> d_user (B, d) | (0, d), d_items (N, d) | (0, d)."""
    # a backward run inside an autocast region must not recast the kernels' own matmuls
    with torch.autocast(user.device.type, enabled=False):
        if backend == "cpp":
            du, dw = _ext._C.sampled_softmax_bwd_cpu(
                grad_rows.to(lse.dtype).contiguous(), user, items, target, negatives, log_q,
                target_log_q, lse, in_batch_negatives, remove_accidental_hits, temperature,
                need_user, need_items)
            return du, dw
        if backend == "triton":
            return _triton()._sampled_softmax_bwd(
                grad_rows.contiguous(), user, items, target, negatives, log_q, target_log_q, lse,
                softmax_item_mean, in_batch_negatives, remove_accidental_hits, temperature,
                need_user, need_items)
        raise ValueError(f"no fused sampled_softmax kernel for backend {backend!r}")


@_sampled_softmax_bwd_op.register_fake
def _(grad_rows, user, items, target, negatives, log_q, target_log_q, lse, softmax_item_mean,
      in_batch_negatives, remove_accidental_hits, temperature, need_user, need_items, backend):
    B, d = user.shape
    N = items.shape[0]
    return user.new_empty((B if need_user else 0, d)), items.new_empty((N if need_items else 0, d))


def _sampled_softmax_setup_context(ctx, inputs, output):
    (user, items, target, negatives, log_q, target_log_q, in_batch, remove_hits, temperature,
     need_user_grad, backend) = inputs
    _, lse, softmax_item_mean = output
    ctx.mark_non_differentiable(lse, softmax_item_mean)
    ctx.args = (in_batch, remove_hits, temperature, backend)
    ctx.save_for_backward(user, items, target, negatives, log_q, target_log_q, lse,
                          softmax_item_mean)


def _sampled_softmax_backward(ctx, grad_rows, _grad_lse, _grad_item_mean):
    (user, items, target, negatives, log_q, target_log_q, lse,
     softmax_item_mean) = ctx.saved_tensors
    in_batch, remove_hits, temperature, backend = ctx.args
    need_user, need_items = ctx.needs_input_grad[:2]
    if grad_rows is None or not (need_user or need_items):
        return (None,) * 11
    du, dw = _sampled_softmax_bwd_op(grad_rows, user, items, target, negatives, log_q,
                                     target_log_q, lse, softmax_item_mean, in_batch, remove_hits,
                                     temperature, need_user, need_items, backend)
    return ((du if need_user else None), (dw if need_items else None)) + (None,) * 9


_sampled_softmax_fwd_op.register_autograd(_sampled_softmax_backward,
                                          setup_context=_sampled_softmax_setup_context)


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------
def _check_sampled(user, items, target, negatives, log_q, target_log_q, in_batch_negatives,
                   remove_accidental_hits, temperature, reduction, check_id_range=True):
    device, B, d, N = check_user_items(user, items)
    check_ids("target", target, (B,), device)
    check_ids("negatives", negatives, None, device)
    if negatives.dim() not in (1, 2):
        raise ValueError(f"negatives must be (S,) shared or (batch, S) per row, got shape "
                         f"{tuple(negatives.shape)}")
    if negatives.dim() == 2 and negatives.shape[0] != B:
        raise ValueError(f"per-row negatives must have shape (batch, S) = ({B}, S), got "
                         f"{tuple(negatives.shape)}")
    if negatives.shape[-1] == 0:
        raise ValueError("negatives is empty (S = 0): a sampled softmax needs at least one "
                         "negative")
    if log_q is not None:
        _checks.tensor("log_q", log_q, dtypes=FLOATS, device=device)
        if log_q.shape != negatives.shape:
            raise ValueError(f"log_q must have the shape of negatives {tuple(negatives.shape)}, "
                             f"got {tuple(log_q.shape)}")
    if target_log_q is not None:
        _checks.tensor("target_log_q", target_log_q, ndim=1, dtypes=FLOATS, device=device)
        if target_log_q.shape[0] != B:
            raise ValueError(f"target_log_q must have shape (batch,) = ({B},), got "
                             f"{tuple(target_log_q.shape)}")
    check_bool("in_batch_negatives", in_batch_negatives)
    check_bool("remove_accidental_hits", remove_accidental_hits)
    temperature = check_float_scalar("temperature", temperature, lo=0.0, lo_open=True)
    _checks.choice("reduction", reduction, REDUCTIONS)
    if check_id_range:   # sharded catalogs check against the global size
        target = check_range("target", target, N)
        negatives = check_range("negatives", negatives, N)
    return device, temperature, target, negatives


def sampled_softmax_loss(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor, *,
                         log_q: Optional[Tensor] = None, target_log_q: Optional[Tensor] = None,
                         in_batch_negatives: bool = True, remove_accidental_hits: bool = True,
                         temperature: float = 1.0, reduction: str = "mean",
                         backend: str = "auto", process_group=None) -> Tensor:
    """Sampled softmax: each row's positive against sampled (and in-batch) negatives.

    Args:
      user: (batch, dim); items: (n_items, dim), same float dtype; target: (batch,) int64.
      negatives: int64 ids, (S,) shared by the whole batch (TF / GRU4Rec style) or (batch, S)
        one set per row. Duplicates are kept (each is a sample); S >= 1.
      log_q: log sampling probability of each negative, same shape as ``negatives`` (shared:
        one value per sample, the same for every row; per row: per (row, sample)). It is
        subtracted from the logit (logQ correction). Pass log(S·q) for TF's expected-count
        convention or log q (a constant shift of all negatives) — whatever you subtract.
        None: no correction.
      target_log_q: (batch,) log-probability of ``target[j]`` appearing as a target (its
        in-batch sampling probability). It corrects row j's positive logit AND column j when
        it serves as an in-batch negative for the other rows (Yi et al. 2019). None: 0.
      in_batch_negatives: use the other rows' targets as extra negatives.
      remove_accidental_hits: drop from row b's partition sum every candidate (negative,
        duplicate, or other row's target) whose id equals target[b] — removed, not
        replaced by a zero logit.
      temperature: > 0; logit = user·item / temperature - logQ.
      reduction: "mean" | "sum" | "none".
      backend: "auto" | "triton" | "cpp" | "eager".
      process_group: None, or a torch.distributed process group (``"default"``) over which the
        catalog is sharded by rows (as in ``linear_cross_entropy``): ``items`` is this rank's
        shard, ids are global, and ``user``/``target``/``negatives``/``log_q``/``target_log_q``
        are identical on every rank. Each rank contributes the candidate rows it owns to one
        all-reduce of the (U, d) candidate table (U = distinct target/negative ids); the loss
        and the user gradient are then those of the single-process op on every rank.

    Autocast: as ``linear_cross_entropy`` (``user``/``items`` cast to the autocast dtype, fp32
    accumulation, the loss in float32). Out-of-range ids: ValueError on CPU (compiled or not),
    a device-side assert without host sync on CUDA.

    Returns the loss in user's dtype (float32 under autocast). ``log_q``/``target_log_q`` get
    no gradient.
    """
    try:
        return _sampled_softmax_public(user, items, target, negatives, log_q, target_log_q,
                                       in_batch_negatives, remove_accidental_hits, temperature,
                                       reduction, backend, process_group)
    except (TypeError, ValueError) as err:
        if not compiling():
            raise
        return deferred_error(err, user)


def _sampled_softmax_public(user, items, target, negatives, log_q, target_log_q,
                            in_batch_negatives, remove_accidental_hits, temperature, reduction,
                            backend, process_group):
    user, items, _, out_dtype = autocast_inputs(user, items)
    if out_dtype is None:
        return _sampled_softmax_loss(user, items, target, negatives, log_q, target_log_q,
                                     in_batch_negatives, remove_accidental_hits, temperature,
                                     reduction, backend, process_group)
    with torch.autocast(user.device.type, enabled=False):
        return _sampled_softmax_loss(user, items, target, negatives, log_q, target_log_q,
                                     in_batch_negatives, remove_accidental_hits, temperature,
                                     reduction, backend, process_group).to(out_dtype)


def _sampled_softmax_loss(user, items, target, negatives, log_q, target_log_q,
                          in_batch_negatives, remove_accidental_hits, temperature, reduction,
                          backend, process_group):
    """``sampled_softmax_loss`` with autocast resolved."""
    device, temperature, target, negatives = _check_sampled(
        user, items, target, negatives, log_q, target_log_q, in_batch_negatives,
        remove_accidental_hits, temperature, reduction, check_id_range=process_group is None)
    if process_group is not None:
        return sampled_softmax_sharded(user, items, target, negatives, log_q, target_log_q,
                                       in_batch_negatives, remove_accidental_hits, temperature,
                                       reduction, backend, process_group)
    return _sampled_softmax_run(user, items, target, negatives, log_q, target_log_q,
                                in_batch_negatives, remove_accidental_hits, temperature,
                                reduction, backend, device)


def _sampled_softmax_run(user, items, target, negatives, log_q, target_log_q,
                         in_batch_negatives, remove_accidental_hits, temperature, reduction,
                         backend, device):
    """The loss on validated arguments (ids in range), autocast resolved: backend choice and
    dispatch."""
    be = resolve_loss_backend(OP, backend, device, user.dtype)
    if be == "eager":
        return sampled_softmax_ref(user, items, target, negatives,
                                   log_q=None if log_q is None else log_q.detach(),
                                   target_log_q=(None if target_log_q is None
                                                 else target_log_q.detach()),
                                   in_batch_negatives=in_batch_negatives,
                                   remove_accidental_hits=remove_accidental_hits,
                                   temperature=temperature, reduction=reduction)
    need_user_grad = torch.is_grad_enabled() and user.requires_grad
    acc = acc_dtype(user.dtype)
    lq = None if log_q is None else log_q.detach().to(acc).contiguous()
    tlq = None if target_log_q is None else target_log_q.detach().to(acc).contiguous()
    loss_rows, _, _ = _sampled_softmax_fwd_op(user, items, target, negatives.contiguous(), lq,
                                              tlq, in_batch_negatives, remove_accidental_hits,
                                              temperature, need_user_grad, be)
    return reduce_rows(loss_rows, reduction, None, user.dtype)


def bpr_max_loss(user: Tensor, items: Tensor, target: Tensor, negatives: Tensor, *,
                 reg: float = 1.0, in_batch_negatives: bool = True,
                 remove_accidental_hits: bool = True, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto") -> Tensor:
    """GRU4Rec's BPR-max over the sampled candidates of ``sampled_softmax_loss`` (no logQ):
    loss_b = -log Σ_j s_j·σ(r_b - r_j) + reg·Σ_j s_j·r_j², s = softmax over the negatives' scores
    r_j (removed accidental hits take part in neither sum).

    Eager composite: the (batch, S [+ batch]) scores are small next to a catalog, so only
    ``backend="auto"``/``"eager"`` exist for it. Argument errors are the same compiled or not.
    """
    try:
        return _bpr_max_loss(user, items, target, negatives, reg, in_batch_negatives,
                             remove_accidental_hits, temperature, reduction, backend)
    except (TypeError, ValueError) as err:
        if not compiling():
            raise
        return deferred_error(err, user)


def _bpr_max_loss(user, items, target, negatives, reg, in_batch_negatives,
                  remove_accidental_hits, temperature, reduction, backend):
    device, temperature, target, negatives = _check_sampled(
        user, items, target, negatives, None, None, in_batch_negatives,
        remove_accidental_hits, temperature, reduction)
    reg = check_float_scalar("reg", reg, lo=0.0)
    if backend not in ("auto", "eager"):
        raise ValueError(f"bpr_max_loss has only the eager backend, got backend={backend!r}")
    return bpr_max_ref(user, items, target, negatives, reg=reg,
                       in_batch_negatives=in_batch_negatives,
                       remove_accidental_hits=remove_accidental_hits, temperature=temperature,
                       reduction=reduction)


# ----------------------------------------------------------------------------------------------
# over a catalog sharded across a process group
# ----------------------------------------------------------------------------------------------
def sampled_softmax_sharded(user, items, target, negatives, log_q, target_log_q,
                            in_batch_negatives, remove_accidental_hits, temperature, reduction,
                            backend, process_group):
    """Arguments as ``sampled_softmax_loss`` (validated there, except the id range)."""
    group, rank, world = check_group(process_group)
    device = user.device
    n_local = items.shape[0]
    offset, N = exchange_shard_offset(group, rank, world, device, n_local, user, target,
                                      negatives, log_q, target_log_q)
    target = check_range("target", target, N)
    negatives = check_range("negatives", negatives, N)
    B = target.shape[0]
    uniq, inv = torch.unique(torch.cat([target, negatives.reshape(-1)]), return_inverse=True)
    owned = (uniq >= offset) & (uniq < offset + n_local)
    loc = (uniq - offset).clamp(0, n_local - 1)
    mine = torch.where(owned[:, None], items[loc], torch.zeros((), dtype=items.dtype,
                                                               device=device))
    table = sum_replicated(mine, group)                       # (U, d), every rank
    # the single-process loss on the candidate table; the arguments are validated already and
    # the remapped ids lie in [0, U) by construction
    return _sampled_softmax_run(user, table, inv[:B], inv[B:].reshape(negatives.shape), log_q,
                                target_log_q, in_batch_negatives, remove_accidental_hits,
                                temperature, reduction, backend, device)
