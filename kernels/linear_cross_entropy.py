"""Triton kernels of the full-catalog softmax cross-entropy (``linear_cross_entropy``), and the
column-softmax kernels that the sampled softmax (``kernels/sampled_softmax.py``) imports from
here for its shared columns, with the ``@triton.jit`` tile helpers its per-row kernels use
(``_load_rows``, ``_kept``, ``_online_lse_step``, ``_store_partials``): they live in this module
because the full catalog is their general case (the sampled softmax passes gathered column ids;
this module never imports the sampled one).

No kernel here ever materialises a (batch, columns) logits tensor. A "column" is an item row
the softmax runs over: the whole catalog (``INDEXED=False``, column j is item j) or a list of
gathered candidates (``INDEXED=True``, column c is item ``ids[c]``: shared sampled negatives
and the in-batch targets of the sampled softmax).

Chain: ``_linear_cross_entropy_fwd_kernel`` / ``_linear_cross_entropy_bwd_kernel`` ->
launchers ``_linear_cross_entropy_fwd`` / ``_linear_cross_entropy_bwd`` ->
``seqrec_fast.ops.linear_cross_entropy`` -> ``seqrec_fast.reference.linear_cross_entropy_ref``.

Forward, ``_linear_cross_entropy_fwd_kernel``, grid (row blocks, column splits): each program
keeps a block of user rows on chip and streams its share of the columns in tiles: s = u·wᵀ
(+ bias), logits z = s/T - logQ, online log-sum-exp in fp32 (base 2), and — when the user
gradient is wanted — the softmax-weighted item mean Σ_c p_c·w_c, accumulated flash-attention
style (acc·α + p·W per tile). The user gradient is then a (B, d) epilogue,
g/T·(softmax_item_mean - w_target), so the backward never recomputes logits for it. Programs of
one row block write partial (max, sum, acc) per split; ``_combine_partials`` (a few
(splits, B[, d]) torch ops) merges them.

Backward, ``_linear_cross_entropy_bwd_kernel``, grid (column blocks, row splits): each program
owns a tile of columns, loops over the batch rows recomputing the logits tile from the saved
LSE in (columns, rows) layout (W·Uᵀ), forms dL/ds = g/T·(p - (1-ε)·onehot - ε/N) there and
accumulates dW_tile = dL/ds·U in fp32 registers (dL/ds is the A operand as it is: no register
transpose between the two dots). Catalog columns with one row split are written once (no
atomics, deterministic, no fp32 (N, d) buffer for bf16 inputs). Small catalogs get row splits and candidates may repeat
(duplicated negatives, in-batch targets) so those accumulate with fp32 atomics into an fp32
buffer.

Numerics: operands stay in the input dtype for tl.dot (tensor cores) with fp32 accumulation;
fp32 inputs run 3xTF32 (fp32-level error) under torch's default
``torch.get_float32_matmul_precision() == "highest"``, plain tf32 when the user allows it.
Under the interpreter (``TRITON_INTERPRET=1``) bf16/fp16 tiles are cast to fp32 before tl.dot
(``CAST_F32``) because the interpreter's bf16 dot is wrong. fp16 backward products use fp32
operands (tf32) for dL/ds so that small gradients do not underflow fp16.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._utils import LN2, LOG2E, contiguous_rows, dot_flags, gpu_tuned, num_sms, pow2


# ----------------------------------------------------------------------------------------------
# tile helpers (inlined into the kernels; the sampled softmax kernels use them too)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(PTR, idx, stride, offs_d, imask, dmask, CAST_F32: tl.constexpr):
    """(len(idx), BLOCK_D) tile of rows ``idx`` of a row-major matrix, 0 where masked; cast to
    fp32 when CAST_F32 (half tiles under the interpreter, whose bf16 tl.dot is wrong)."""
    t = tl.load(PTR + idx[:, None] * stride + offs_d[None, :],
                mask=imask[:, None] & dmask[None, :], other=0.0)
    if CAST_F32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _column_ids(IDS, cols, cmask, INDEXED: tl.constexpr):
    """Item id of each column: ``ids[c]`` for gathered candidates, else the column itself."""
    if INDEXED:
        wid = tl.load(IDS + cols, mask=cmask, other=0)
    else:
        wid = cols
    return wid


@triton.jit
def _row_targets(TGT, rows, rmask, NEEDED: tl.constexpr):
    """Target id of each row when a kernel variant reads them (else the row index, unused)."""
    if NEEDED:
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
    else:
        tgt = rows
    return tgt


@triton.jit
def _kept(valid, cand_ids, tgt, cols, rows, EXCLUDE_HITS: tl.constexpr,
          EXCLUDE_DIAG: tl.constexpr):
    """``valid`` (rows, candidates) without the accidental hits (candidate id ``cand_ids``
    == the row's target) and, for in-batch columns, the diagonal (column j of row j is its
    positive)."""
    if EXCLUDE_HITS:
        valid = valid & (cand_ids != tgt[:, None])
    if EXCLUDE_DIAG:
        valid = valid & (cols[None, :] != rows[:, None])
    return valid


@triton.jit
def _online_lse_step(m, l, z2):
    """One tile of a base-2 online log-sum-exp over axis 1 of z2 (rows, columns): -> the new
    running max, the rescale factor of the old partials, exp2(z2 - max), the new sum.

    The running max starts at -inf (a finite sentinel would be a real logit at tiny
    temperatures). A non-finite max is not subtracted: rows with nothing kept yet stay at
    l = 0, and a +inf logit (a logQ of -inf) makes the sum, hence the lse, +inf, as in the
    eager reference."""
    m_new = tl.maximum(m, tl.max(z2, axis=1))
    m_sub = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
    alpha = tl.exp2(m - m_sub)
    p = tl.exp2(z2 - m_sub[:, None])
    return m_new, alpha, p, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _store_partials(M_OUT, L_OUT, ACC_OUT, out, m, l, acc, rmask, offs_d, dmask, D,
                    COMPUTE_ACC: tl.constexpr):
    """A program's (max, sum[, acc]) partials for its rows at slots ``out`` (split * B + row)."""
    tl.store(M_OUT + out, m, mask=rmask)
    tl.store(L_OUT + out, l, mask=rmask)
    if COMPUTE_ACC:
        tl.store(ACC_OUT + out[:, None] * D + offs_d[None, :], acc,
                 mask=rmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _linear_cross_entropy_fwd_kernel(
    U, W, IDS, BIAS, OFF, TGT,             # inputs
    M_OUT, L_OUT, SZ_OUT, ACC_OUT,         # partial outputs, (P, B) / (P, B, D), fp32
    B, C, D, tiles_per_split, split_base,
    stride_ub, stride_wn,
    scale2,                                # log2(e) / T
    INDEXED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFF: tl.constexpr,
    EXCLUDE_HITS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, SMOOTH: tl.constexpr,
    COMPUTE_ACC: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    u = _load_rows(U, rows, stride_ub, offs_d, rmask, dmask, CAST_F32)
    tgt = _row_targets(TGT, rows, rmask, EXCLUDE_HITS)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    sz = tl.zeros([BLOCK_B], tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    col0 = pid_s * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        cols = col0 + t * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < C
        wid = _column_ids(IDS, cols, cmask, INDEXED)
        w = _load_rows(W, wid, stride_wn, offs_d, cmask, dmask, CAST_F32)
        s = tl.dot(u, tl.trans(w), input_precision=PREC)  # (BLOCK_B, BLOCK_N) fp32
        if HAS_BIAS:
            s += tl.load(BIAS + wid, mask=cmask, other=0.0).to(tl.float32)[None, :]
        z2 = s * scale2
        if HAS_OFF:
            z2 -= (tl.load(OFF + cols, mask=cmask, other=0.0).to(tl.float32)
                   * 1.4426950408889634)[None, :]
        valid = _kept(cmask[None, :] & rmask[:, None], wid[None, :], tgt, cols, rows,
                      EXCLUDE_HITS, EXCLUDE_DIAG)
        if SMOOTH:
            sz += tl.sum(tl.where(valid, s, 0.0), axis=1)
        z2 = tl.where(valid, z2, float("-inf"))
        m, alpha, p, l = _online_lse_step(m, l, z2)
        if COMPUTE_ACC:
            acc = acc * alpha[:, None] + tl.dot(p.to(w.dtype), w, input_precision=PREC)
    out = (split_base + pid_s) * B + rows
    _store_partials(M_OUT, L_OUT, ACC_OUT, out, m, l, acc, rmask, offs_d, dmask, D, COMPUTE_ACC)
    if SMOOTH:
        tl.store(SZ_OUT + out, sz, mask=rmask)


@triton.jit
def _target_logit_kernel(
    U, W, TGT, BIAS, TOFF, ZT,
    B, D, stride_ub, stride_wn, scale, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_TOFF: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """zt[b] = (u_b·w_{t_b} + bias[t_b]) / T - toff[b], gathered directly (0 for ignored rows)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    t = tl.load(TGT + rows, mask=rmask, other=ignore_index)
    ok = rmask & (t != ignore_index)
    t = tl.where(ok, t, 0)
    u = tl.load(U + rows[:, None] * stride_ub + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    w = tl.load(W + t[:, None] * stride_wn + offs_d[None, :],
                mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    z = tl.sum(u * w, axis=1)
    if HAS_BIAS:
        z += tl.load(BIAS + t, mask=ok, other=0.0).to(tl.float32)
    z = z * scale
    if HAS_TOFF:
        z -= tl.load(TOFF + rows, mask=rmask, other=0.0).to(tl.float32)
    z = tl.where(ok, z, 0.0)
    tl.store(ZT + rows, z, mask=rmask)


@triton.jit
def _linear_cross_entropy_bwd_kernel(
    U, W, IDS, BIAS, OFF, TGT, LSE, G,     # inputs (LSE natural log, G = dloss_b, fp32)
    SLOT,                                  # HAS_SLOT: output row of each column (else its id)
    DW, DBIAS,                             # outputs: (N, D) / (N,), fp32 buffers when ATOMIC
    B, C, D, rows_per_split,
    stride_ub, stride_wn, stride_dw,
    scale, scale2, keep_target, smooth_coef,
    INDEXED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFF: tl.constexpr,
    EXCLUDE_HITS: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, ONEHOT: tl.constexpr,
    SMOOTH: tl.constexpr, NEED_DBIAS: tl.constexpr, ATOMIC: tl.constexpr,
    HAS_SLOT: tl.constexpr,
    CAST_F32: tl.constexpr, DZ_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    wid = _column_ids(IDS, cols, cmask, INDEXED)
    w = _load_rows(W, wid, stride_wn, offs_d, cmask, dmask, CAST_F32)
    if HAS_BIAS:
        bias = tl.load(BIAS + wid, mask=cmask, other=0.0).to(tl.float32)
    if HAS_OFF:
        off2 = tl.load(OFF + cols, mask=cmask, other=0.0).to(tl.float32) * 1.4426950408889634
    dw = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    r_start = pid_r * rows_per_split
    for r0 in range(0, rows_per_split, BLOCK_B):
        rows = r_start + r0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        u = _load_rows(U, rows, stride_ub, offs_d, rmask, dmask, CAST_F32)
        g = tl.load(G + rows, mask=rmask, other=0.0) * scale        # dL/ds factor per row
        lse2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
        # transposed orientation, (columns, rows): the logits tile is w·uᵀ and its dL/ds is
        # directly the A operand of dW += dL/ds·u (no register transpose between the dots)
        s = tl.dot(w, tl.trans(u), input_precision=PREC)             # (BLOCK_N, BLOCK_B)
        if HAS_BIAS:
            s += bias[:, None]
        z2 = s * scale2
        if HAS_OFF:
            z2 -= off2[:, None]
        valid = cmask[:, None] & rmask[None, :]
        if EXCLUDE_HITS or ONEHOT:
            tgt = tl.load(TGT + rows, mask=rmask, other=-1)
        else:
            tgt = rows  # unused
        if EXCLUDE_HITS:
            valid = valid & (wid[:, None] != tgt[None, :])
        if EXCLUDE_DIAG:
            valid = valid & (cols[:, None] != rows[None, :])
        p = tl.exp2(z2 - lse2[None, :])
        # a probability is at most 1: at tiny temperatures the recomputed logit and the saved
        # lse differ by rounding amplified by 1/T (NaN, from a +inf logit, stays NaN)
        dz = tl.where(valid, tl.where(p > 1.0, 1.0, p), 0.0)
        if ONEHOT:
            dz -= tl.where(cols[:, None] == tgt[None, :], keep_target, 0.0)
        if SMOOTH:
            dz -= tl.where(valid, smooth_coef, 0.0)
        dz = dz * g[None, :]
        if NEED_DBIAS:
            db += tl.sum(dz, axis=1)
        if DZ_F32:
            dw += tl.dot(dz, u.to(tl.float32), input_precision=PREC)
        else:
            dw += tl.dot(dz.to(u.dtype), u, input_precision=PREC)
    wmask = cmask[:, None] & dmask[None, :]
    if HAS_SLOT:
        orow = tl.load(SLOT + cols, mask=cmask, other=0)
    else:
        orow = wid
    dptr = DW + orow[:, None] * stride_dw + offs_d[None, :]
    if ATOMIC:
        tl.atomic_add(dptr, dw, mask=wmask)
        if NEED_DBIAS:
            tl.atomic_add(DBIAS + wid, db, mask=cmask)
    else:
        tl.store(dptr, dw.to(DW.dtype.element_ty), mask=wmask)
        if NEED_DBIAS:
            tl.store(DBIAS + wid, db.to(DBIAS.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
# GPU tile sizes, checked on sm_90 with bench/sm90_report.py (no spill, shared memory well
# under 227 KB at the headline shapes, every dot a wgmma) and kept under ~100 KB of shared
# memory so that sm_80 fits too. The bytes of one item row (BLOCK_D · element size) decide the
# column tile and the pipelining. fp32 dots run as 3xTF32 (``fp32_dot_precision``), which
# splits each operand into hi/lo tf32 parts in registers: fp32 gets narrower tiles than
# bf16/fp16. Gathered columns (``indexed``: sampled candidates) hold more per-tile state (ids,
# logQ, hit masks): their forward column tile is at most 64 in half precision.
def _fwd_config(B: int, d: int, device, elem: int = 2, indexed: bool = False):
    bd = pow2(d, 16)
    if not gpu_tuned(device):
        return dict(BLOCK_B=pow2(B, 16, 64), BLOCK_N=32, BLOCK_D=bd), {}
    row = bd * elem
    block_b = pow2(B, 16, 128 if row <= 256 else 64)
    if elem >= 4:
        block_n = 32 if row <= 256 else 16
    else:
        block_n = 128 if row <= 128 else (64 if row <= 512 else 32)
        if indexed:
            block_n = min(block_n, 64)
    warps = 8 if block_b * block_n >= 128 * 32 else 4
    stages = 3 if row <= 256 else (1 if elem >= 4 else 2)
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=bd), dict(num_warps=warps,
                                                                     num_stages=stages)


def _bwd_config(d: int, device, elem: int = 2):
    bd = pow2(d, 16)
    if not gpu_tuned(device):
        return dict(BLOCK_B=32, BLOCK_N=32, BLOCK_D=bd), {}
    row = bd * elem
    if elem >= 4:  # BLOCK_N = 64: both dots keep M = 64 (wgmma) in the (columns, rows) layout
        return dict(BLOCK_B=32 if row <= 256 else 16, BLOCK_N=64, BLOCK_D=bd), dict(
            num_warps=4, num_stages=2 if row <= 256 else 1)
    block_n = 128 if row <= 128 else (64 if row <= 512 else 32)
    block_b = 64 if row <= 512 else 32
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=bd), dict(
        num_warps=8 if block_n == 128 else 4, num_stages=3 if row <= 256 else 2)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _columns_fwd(user, items, ids, bias, off, tgt, *, C, temperature, exclude_hits,
                 exclude_diag, smooth, compute_acc, splits: Optional[int], parts: list):
    """Launch the column kernel; appends (m2, l, sz, acc) partials (P, B[, d]) to ``parts``."""
    B, d = user.shape
    cfg, opts = _fwd_config(B, d, user.device, user.element_size(), ids is not None)
    n_tiles = triton.cdiv(C, cfg["BLOCK_N"])
    b_blocks = triton.cdiv(B, cfg["BLOCK_B"])
    if splits is None:
        splits = max(1, min(n_tiles, (4 * num_sms(user.device)) // b_blocks))
    splits = max(1, min(splits, n_tiles))
    tiles_per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per)
    f32 = dict(device=user.device, dtype=torch.float32)
    m = torch.empty(splits, B, **f32)
    l = torch.empty(splits, B, **f32)
    sz = torch.empty(splits, B, **f32) if smooth else m
    acc = torch.empty(splits, B, d, **f32) if compute_acc else m
    cast, prec = dot_flags(user)
    dummy = m
    _linear_cross_entropy_fwd_kernel[(b_blocks, splits)](
        user, items, ids if ids is not None else dummy, bias if bias is not None else dummy,
        off if off is not None else dummy, tgt if tgt is not None else dummy,
        m, l, sz, acc,
        B, C, d, tiles_per, 0,
        user.stride(0), items.stride(0),
        LOG2E / temperature,
        INDEXED=ids is not None, HAS_BIAS=bias is not None, HAS_OFF=off is not None,
        EXCLUDE_HITS=exclude_hits, EXCLUDE_DIAG=exclude_diag, SMOOTH=smooth,
        COMPUTE_ACC=compute_acc, CAST_F32=cast, PREC=prec, **cfg, **opts)
    parts.append((m, l, sz if smooth else None, acc if compute_acc else None))


def _target_logits(user, items, target, bias, toff, temperature, ignore_index):
    B, d = user.shape
    zt = torch.empty(B, device=user.device, dtype=torch.float32)
    bd = pow2(d, 16)
    bb = 16 if bd <= 128 else 8
    dummy = zt
    _target_logit_kernel[(triton.cdiv(B, bb),)](
        user, items, target, bias if bias is not None else dummy,
        toff if toff is not None else dummy, zt,
        B, d, user.stride(0), items.stride(0), 1.0 / temperature, ignore_index,
        HAS_BIAS=bias is not None, HAS_TOFF=toff is not None, BLOCK_B=bb, BLOCK_D=bd)
    return zt


def _combine_partials(parts: Sequence, extra=None):
    """Merge partial (m2 (P,B), l (P,B), acc (P,B,d) | None) into lse (B,) and
    softmax_item_mean = Σ p·w (B, d) | None. ``extra``: (z (B,), w (B, d) | None) one more
    column per row."""
    ms = [p[0] for p in parts]
    ls = [p[1] for p in parts]
    accs = [p[3] for p in parts]
    if extra is not None:
        z, w = extra
        ms.append((z * LOG2E)[None])
        ls.append(torch.ones_like(z)[None])
        accs.append(None if w is None else w.float()[None])
    m = torch.cat(ms, 0)
    l = torch.cat(ls, 0)
    mx = m.max(0).values
    # a non-finite max is not subtracted (see _online_lse_step): +inf stays +inf
    sc = torch.exp2(m - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    total = (l * sc).sum(0)
    lse = (mx + torch.log2(total)) * LN2
    softmax_item_mean = None
    if accs[0] is not None:
        acc = torch.cat(accs, 0)
        softmax_item_mean = (acc * sc[..., None]).sum(0) / total[:, None]
    return lse, softmax_item_mean


def _linear_cross_entropy_fwd(user, items, target, bias, temperature: float,
                              ignore_index: int, label_smoothing: float, need_user_grad: bool,
                              splits: Optional[int] = None):
    """Full-catalog CE forward. -> loss_rows (B,) fp32 (0 at ignored rows), lse (B,) fp32,
    softmax_item_mean (B, d) fp32 = Σ_j softmax_j·items_j (or (0, d) when ``need_user_grad``
    is False)."""
    user, items = contiguous_rows(user), contiguous_rows(items)
    target = target.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, d = user.shape
    N = items.shape[0]
    smooth = label_smoothing > 0
    parts = []
    _columns_fwd(user, items, None, bias, None, None, C=N, temperature=temperature,
                 exclude_hits=False, exclude_diag=False, smooth=smooth,
                 compute_acc=need_user_grad, splits=splits, parts=parts)
    lse, softmax_item_mean = _combine_partials(parts)
    zt = _target_logits(user, items, target, bias, None, temperature, ignore_index)
    valid = target != ignore_index
    loss = lse - (1.0 - label_smoothing) * zt
    if smooth:
        sz = parts[0][2].sum(0)
        loss = loss - (label_smoothing / N / temperature) * sz
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if softmax_item_mean is None:
        softmax_item_mean = user.new_empty((0, d), dtype=torch.float32)
    return loss, lse, softmax_item_mean


def _linear_cross_entropy_bwd(grad_rows, user, items, target, bias, lse, softmax_item_mean,
                              temperature: float, ignore_index: int, label_smoothing: float,
                              need_user: bool, need_items: bool, need_bias: bool,
                              b_splits: Optional[int] = None):
    """-> (d_user (B, d) | empty, d_items (N, d) | empty, d_bias (N,) | empty)."""
    user, items = contiguous_rows(user), contiguous_rows(items)
    target, lse = target.contiguous(), lse.contiguous()
    bias = bias.contiguous() if bias is not None else None
    B, d = user.shape
    N = items.shape[0]
    valid = target != ignore_index
    g = torch.where(valid, grad_rows.float(), torch.zeros_like(lse))
    scale = 1.0 / temperature
    d_user = user.new_empty((0, d))
    if need_user:
        safe_t = torch.where(valid, target, torch.zeros_like(target))
        du = softmax_item_mean - (1.0 - label_smoothing) * items[safe_t].float()
        if label_smoothing > 0:
            du = du - (label_smoothing / N) * items.sum(0, dtype=torch.float32)[None, :]
        d_user = (du * (g * scale)[:, None]).to(user.dtype)
    d_items = items.new_empty((0, d))
    d_bias = items.new_empty((0,))
    if need_items or need_bias:
        d_items, d_bias = _columns_bwd(user, items, None, bias, None, target, lse, g, C=N, N=N,
                                       temperature=temperature, exclude_hits=False,
                                       exclude_diag=False, onehot=True,
                                       keep_target=1.0 - label_smoothing,
                                       smooth_coef=label_smoothing / N,
                                       need_bias=need_bias, b_splits=b_splits,
                                       force_atomic=False)
        if not need_items:
            d_items = items.new_empty((0, d))
    return d_user, d_items, d_bias


def _columns_bwd(user, items, ids, bias, off, tgt, lse, g, *, C, N, temperature, exclude_hits,
                 exclude_diag, onehot, keep_target, smooth_coef, need_bias, b_splits,
                 force_atomic, out=None, slot=None):
    """Item (and bias) gradients of the column softmax. ``out``: fp32 (rows, d) buffer to
    accumulate into atomically (then returned as is); ``slot`` (C,) int64: the row of ``out``
    each column adds into (default: its item id)."""
    B, d = user.shape
    cfg, opts = _bwd_config(d, user.device, user.element_size())
    n_blocks = triton.cdiv(C, cfg["BLOCK_N"])
    r_blocks = triton.cdiv(B, cfg["BLOCK_B"])
    if b_splits is None:
        want = 2 * num_sms(user.device)
        b_splits = 1 if n_blocks >= want else min(r_blocks, triton.cdiv(want, n_blocks))
    b_splits = max(1, min(b_splits, r_blocks))
    rows_per = triton.cdiv(r_blocks, b_splits) * cfg["BLOCK_B"]
    b_splits = triton.cdiv(B, rows_per) if B > 0 else 1
    atomic = force_atomic or b_splits > 1 or out is not None
    if atomic:
        dw = out if out is not None else torch.zeros(N, d, device=user.device, dtype=torch.float32)
        db = torch.zeros(N, device=user.device, dtype=torch.float32) if need_bias else dw
    else:
        dw = torch.empty(N, d, device=user.device, dtype=items.dtype)
        db = torch.empty(N, device=user.device, dtype=bias.dtype) if need_bias else dw
    cast, prec = dot_flags(user)
    dz_f32 = cast or user.dtype in (torch.float16, torch.float32)
    dummy = lse
    _linear_cross_entropy_bwd_kernel[(n_blocks, b_splits)](
        user, items, ids if ids is not None else dummy, bias if bias is not None else dummy,
        off if off is not None else dummy, tgt if tgt is not None else dummy, lse, g,
        slot if slot is not None else dummy, dw, db,
        B, C, d, rows_per,
        user.stride(0), items.stride(0), dw.stride(0),
        1.0 / temperature, LOG2E / temperature, keep_target, smooth_coef,
        INDEXED=ids is not None, HAS_BIAS=bias is not None, HAS_OFF=off is not None,
        EXCLUDE_HITS=exclude_hits, EXCLUDE_DIAG=exclude_diag, ONEHOT=onehot,
        SMOOTH=smooth_coef > 0, NEED_DBIAS=need_bias, ATOMIC=atomic,
        HAS_SLOT=slot is not None, CAST_F32=cast,
        DZ_F32=dz_f32, PREC=prec, **cfg, **opts)
    if out is not None:
        return dw, None
    d_items = dw.to(items.dtype) if atomic else dw
    d_bias = (db.to(bias.dtype) if atomic else db) if need_bias else items.new_empty((0,))
    return d_items, d_bias

