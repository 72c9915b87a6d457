"""Triton kernels of the sampled softmax (``sampled_softmax_loss``): shared sampled negatives,
in-batch negatives, per-row negatives, logQ correction and accidental-hit removal.

Chain: the column kernels of ``kernels/linear_cross_entropy.py`` (imported from there: shared
negatives and in-batch targets are gathered columns, ``INDEXED=True``) plus
``_sampled_softmax_row_negatives_fwd_kernel`` / ``_bwd_kernel`` -> launchers
``_sampled_softmax_fwd`` / ``_sampled_softmax_bwd`` -> ``seqrec_fast.ops.sampled_softmax`` ->
``seqrec_fast.reference.sampled_softmax_ref``.

Per-row negatives (B, S) are a batched gather-dot rather than a GEMM: the row-negatives kernels
handle them with 3-D (rows, samples, d) tiles and scatter item gradients with fp32 atomics
(never a (B, S, d) tensor). The positive is one more column per row, merged by
``_combine_partials``; its item gradient is a (B, d) index_add. The backward accumulates item
gradients per distinct candidate id in a compact fp32 (U, d) table (U <= candidates), cast
once and scattered into the dense (N, d) gradient: no fp32 (N, d) buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import LOG2E, contiguous_rows, gpu_tuned, pow2
from .linear_cross_entropy import (_columns_bwd, _columns_fwd, _combine_partials, _kept,
                                   _load_rows, _online_lse_step, _row_targets, _store_partials,
                                   _target_logits)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_negative_logits(u, W, NEG, LOGQ, rows, rmask, ss, S, offs_d, dmask, stride_wn,
                         stride_neg, stride_lq, scale2, HAS_LOGQ: tl.constexpr):
    """Samples ``ss`` of the rows' own negatives: -> ids (rows, samples), valid, the gathered
    fp32 item rows w (rows, samples, d) with their mask, and the base-2 logits
    z2 = (u·w / T - log_q)·log2(e) (rows, samples)."""
    valid = rmask[:, None] & (ss < S)[None, :]
    ids = tl.load(NEG + rows[:, None] * stride_neg + ss[None, :], mask=valid, other=0)
    wmask = valid[:, :, None] & dmask[None, None, :]
    w = tl.load(W + ids[:, :, None] * stride_wn + offs_d[None, None, :],
                mask=wmask, other=0.0).to(tl.float32)
    z2 = tl.sum(u[:, None, :] * w, axis=2) * scale2
    if HAS_LOGQ:
        z2 -= tl.load(LOGQ + rows[:, None] * stride_lq + ss[None, :], mask=valid,
                      other=0.0).to(tl.float32) * 1.4426950408889634
    return ids, valid, w, wmask, z2


@triton.jit
def _sampled_softmax_row_negatives_fwd_kernel(
    U, W, NEG, LOGQ, TGT,
    M_OUT, L_OUT, ACC_OUT,
    B, S, D, split,
    stride_ub, stride_wn, stride_neg, stride_lq,
    scale2,
    HAS_LOGQ: tl.constexpr, EXCLUDE_HITS: tl.constexpr, COMPUTE_ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-row negatives (B, S): online LSE over u_b·w_{neg[b, s]}/T - log_q[b, s]."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    u = _load_rows(U, rows, stride_ub, offs_d, rmask, dmask, True)
    tgt = _row_targets(TGT, rows, rmask, EXCLUDE_HITS)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)  # see _online_lse_step
    l = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        ids, valid, w, _, z2 = _row_negative_logits(u, W, NEG, LOGQ, rows, rmask, ss, S, offs_d,
                                                    dmask, stride_wn, stride_neg, stride_lq,
                                                    scale2, HAS_LOGQ)
        valid = _kept(valid, ids, tgt, ss, rows, EXCLUDE_HITS, False)
        z2 = tl.where(valid, z2, float("-inf"))
        m, alpha, p, l = _online_lse_step(m, l, z2)
        if COMPUTE_ACC:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * w, axis=1)
    _store_partials(M_OUT, L_OUT, ACC_OUT, split * B + rows, m, l, acc, rmask, offs_d, dmask, D,
                    COMPUTE_ACC)


@triton.jit
def _sampled_softmax_row_negatives_bwd_kernel(
    U, W, NEG, LOGQ, TGT, LSE, G, SLOT, DW,
    B, S, D,
    stride_ub, stride_wn, stride_neg, stride_lq, stride_dw,
    scale, scale2,
    HAS_LOGQ: tl.constexpr, EXCLUDE_HITS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Item gradients of per-row negatives, scattered with fp32 atomics into DW (U, D) fp32 at
    row SLOT[b, s] (SLOT: (B, S) contiguous, the compact row of item NEG[b, s])."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    u = _load_rows(U, rows, stride_ub, offs_d, rmask, dmask, True)
    g = tl.load(G + rows, mask=rmask, other=0.0) * scale
    lse2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    tgt = _row_targets(TGT, rows, rmask, EXCLUDE_HITS)
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        ids, valid, w, wmask, z2 = _row_negative_logits(u, W, NEG, LOGQ, rows, rmask, ss, S,
                                                        offs_d, dmask, stride_wn, stride_neg,
                                                        stride_lq, scale2, HAS_LOGQ)
        keep = _kept(valid, ids, tgt, ss, rows, EXCLUDE_HITS, False)
        p = tl.exp2(z2 - lse2[:, None])
        dz = tl.where(keep, tl.where(p > 1.0, 1.0, p), 0.0) * g[:, None]  # p <= 1 (see cols)
        orow = tl.load(SLOT + rows[:, None] * S + ss[None, :], mask=valid, other=0)
        tl.atomic_add(DW + orow[:, :, None] * stride_dw + offs_d[None, None, :],
                      dz[:, :, None] * u[:, None, :], mask=wmask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _row_negatives_config(d: int, S: int, device):
    bd = pow2(d, 16)
    if not gpu_tuned(device):
        return dict(BLOCK_B=4, BLOCK_S=pow2(S, 8, 16), BLOCK_D=bd), {}
    block_s = pow2(min(S, 4096 // bd), 8, 64)
    return dict(BLOCK_B=4, BLOCK_S=block_s, BLOCK_D=bd), dict(num_warps=4)


def _sampled_columns(target, negatives, log_q, target_log_q, in_batch: bool):
    """Shared columns (ids (C,), logQ offsets (C,) | None, exclude_diag) of the sampled softmax:
    the in-batch targets first (column j = row j's target), then shared negatives."""
    ids, offs = [], []
    has_off = target_log_q is not None or (log_q is not None and negatives.dim() == 1)
    if in_batch:
        ids.append(target)
        if has_off:
            offs.append(target_log_q.float() if target_log_q is not None
                        else torch.zeros(target.shape[0], device=target.device))
    if negatives.dim() == 1:
        ids.append(negatives)
        if has_off:
            offs.append(log_q.float() if log_q is not None
                        else torch.zeros(negatives.shape[0], device=target.device))
    if not ids:
        return None, None
    col_ids = torch.cat(ids).contiguous() if len(ids) > 1 else ids[0].contiguous()
    col_off = (torch.cat(offs).contiguous() if len(offs) > 1 else offs[0].contiguous()) \
        if has_off else None
    return col_ids, col_off


def _row_negatives_fwd(user, items, negatives, log_q, target, temperature, remove_hits,
                       compute_acc, parts):
    """Per-row negatives (B, S): appends their (m2, l, None, acc) partials (1, B[, d])."""
    B, d = user.shape
    S = negatives.shape[1]
    cfg, opts = _row_negatives_config(d, S, user.device)
    f32 = dict(device=user.device, dtype=torch.float32)
    m = torch.empty(1, B, **f32)
    l = torch.empty(1, B, **f32)
    acc = torch.empty(1, B, d, **f32) if compute_acc else m
    negatives = contiguous_rows(negatives)
    lq = contiguous_rows(log_q) if log_q is not None else None
    _sampled_softmax_row_negatives_fwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        user, items, negatives, lq if lq is not None else m, target, m, l, acc,
        B, S, d, 0, user.stride(0), items.stride(0), negatives.stride(0),
        lq.stride(0) if lq is not None else 0, LOG2E / temperature,
        HAS_LOGQ=lq is not None, EXCLUDE_HITS=remove_hits, COMPUTE_ACC=compute_acc,
        **cfg, **opts)
    parts.append((m, l, None, acc if compute_acc else None))


def _row_negatives_bwd(user, items, negatives, log_q, target, lse, g, temperature, remove_hits,
                       dw, slot):
    """Item gradients of the per-row negatives (B, S), atomically added into ``dw`` (U, d)
    fp32 at rows ``slot`` (B, S)."""
    B, d = user.shape
    S = negatives.shape[1]
    cfg, opts = _row_negatives_config(d, S, user.device)
    negatives = contiguous_rows(negatives)
    lq = contiguous_rows(log_q) if log_q is not None else None
    _sampled_softmax_row_negatives_bwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        user, items, negatives, lq if lq is not None else lse, target, lse, g,
        slot.contiguous(), dw,
        B, S, d, user.stride(0), items.stride(0), negatives.stride(0),
        lq.stride(0) if lq is not None else 0, dw.stride(0),
        1.0 / temperature, LOG2E / temperature,
        HAS_LOGQ=lq is not None, EXCLUDE_HITS=remove_hits, **cfg, **opts)


def _sampled_softmax_fwd(user, items, target, negatives, log_q, target_log_q, in_batch: bool,
                         remove_hits: bool, temperature: float, need_user_grad: bool,
                         splits: Optional[int] = None):
    """-> loss_rows (B,) fp32, lse (B,) fp32, softmax_item_mean (B, d) fp32 | (0, d)."""
    user, items = contiguous_rows(user), contiguous_rows(items)
    target = target.contiguous()
    B, d = user.shape
    col_ids, col_off = _sampled_columns(target, negatives, log_q, target_log_q, in_batch)
    parts = []
    if col_ids is not None:
        _columns_fwd(user, items, col_ids, None, col_off, target, C=col_ids.shape[0],
                     temperature=temperature, exclude_hits=remove_hits, exclude_diag=in_batch,
                     smooth=False, compute_acc=need_user_grad, splits=splits, parts=parts)
    if negatives.dim() == 2 and negatives.shape[1] > 0:
        _row_negatives_fwd(user, items, negatives, log_q, target, temperature, remove_hits,
                           need_user_grad, parts)
    toff = target_log_q.float().contiguous() if target_log_q is not None else None
    zpos = _target_logits(user, items, target, None, toff, temperature, -(2 ** 62))
    wpos = items[target] if need_user_grad else None
    lse, softmax_item_mean = _combine_partials(parts, extra=(zpos, wpos))
    loss = lse - zpos
    if softmax_item_mean is None:
        softmax_item_mean = user.new_empty((0, d), dtype=torch.float32)
    return loss, lse, softmax_item_mean


def _sampled_softmax_bwd(grad_rows, user, items, target, negatives, log_q, target_log_q, lse,
                         softmax_item_mean, in_batch: bool, remove_hits: bool,
                         temperature: float, need_user: bool, need_items: bool):
    """-> (d_user (B, d) | empty, d_items (N, d) | empty)."""
    user, items = contiguous_rows(user), contiguous_rows(items)
    target, lse = target.contiguous(), lse.contiguous()
    B, d = user.shape
    N = items.shape[0]
    g = grad_rows.float().contiguous()
    scale = 1.0 / temperature
    d_user = user.new_empty((0, d))
    if need_user:
        wpos = items[target].float()
        d_user = ((softmax_item_mean - wpos) * (g * scale)[:, None]).to(user.dtype)
    d_items = items.new_empty((0, d))
    if need_items:
        col_ids, col_off = _sampled_columns(target, negatives, log_q, target_log_q, in_batch)
        per_row = negatives.dim() == 2 and negatives.shape[1] > 0
        # Only the candidate rows are touched: every candidate (shared column, per-row
        # negative, positive) adds into an fp32 row of a compact (U, d) table, one row per
        # distinct item id, found by a sort (no host sync); the table is cast once and
        # scattered into the dense (N, d) gradient in the items' dtype. No fp32 (N, d).
        parts = ([col_ids] if col_ids is not None else []) + \
            ([negatives.reshape(-1)] if per_row else []) + [target]
        cand = torch.cat(parts) if len(parts) > 1 else parts[0]
        sorted_ids, perm = torch.sort(cand)
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        rank = torch.cumsum(first, 0) - 1                     # compact row of sorted entry k
        slot = torch.empty_like(rank)
        slot[perm] = rank                                     # compact row of candidate k
        table = torch.zeros(min(cand.shape[0], N), d, device=user.device, dtype=torch.float32)
        k0 = 0
        if col_ids is not None:
            C = col_ids.shape[0]
            _columns_bwd(user, items, col_ids, None, col_off, target, lse, g,
                         C=C, N=N, temperature=temperature,
                         exclude_hits=remove_hits, exclude_diag=in_batch, onehot=False,
                         keep_target=0.0, smooth_coef=0.0, need_bias=False, b_splits=None,
                         force_atomic=True, out=table, slot=slot[:C])
            k0 = C
        if per_row:
            n_neg = negatives.numel()
            _row_negatives_bwd(user, items, negatives, log_q, target, lse, g, temperature,
                               remove_hits, table, slot[k0:k0 + n_neg].view(negatives.shape))
            k0 += n_neg
        # the positive: dL/dw_t = -g/T·(1 - p_pos)·u, p_pos = exp(z_pos - lse), z_pos from the
        # forward's own kernel (the same bits: at tiny temperatures any other rounding of it
        # is amplified by 1/T), p_pos <= 1 (NaN stays NaN)
        toff = target_log_q.float().contiguous() if target_log_q is not None else None
        zpos = _target_logits(user, items, target, None, toff, temperature, -(2 ** 62))
        coef = (torch.exp(zpos - lse).clamp(max=1.0) - 1.0) * g * scale
        table.index_add_(0, slot[k0:], coef[:, None] * user.float())
        d_items = torch.zeros(N, d, device=user.device, dtype=items.dtype)
        # duplicated ids write the same (cast-once) row: no accumulation, any order
        d_items[sorted_ids] = table.to(items.dtype)[rank]
    return d_user, d_items
