"""Triton kernels of capsule (dynamic) routing: MIND (shared u_hat) and ComiRec-DR (per position).

Chain: ``_routing_fwd_kernel`` / ``_routing_bwd_kernel`` -> launchers ``_routing_fwd`` /
``_routing_bwd`` -> ``seqrec_fast.ops.routing`` -> ``seqrec_fast.reference.routing_iterations_ref``.

Layouts of u_hat (element (b, k, l, j) at ``u[b*sUb + k*sUk + l*sUl + j]``):
  shared (MIND):        u (B, L, d) contiguous, sUb = L*d, sUk = 0, sUl = d
  per_position (DR):    u (L, B, K, d) contiguous, sUb = K*d, sUk = d, sUl = B*K*d

Design: one program per batch row (grid (B,)).
  Forward: T routing iterations; iteration i makes one pass over the row's u that both updates
  the logits, b_i = b_{i-1} + <u, v_{i-1}>, and accumulates s_i = sum_l c_i u (interest-axis
  softmax is local to a position; the sequence-axis softmax is an online softmax with running
  max / denominator and rescaling when the row is chunked).
  * shared layout with L*d small (<= _RESIDENT_MAX elements after padding): the row's u tile is
    loaded once and stays in registers for all iterations (u read once per kernel);
  * otherwise (long rows, and always per position, whose rows are K times larger) the
    sequence is streamed in chunks of BLOCK_L positions, u read once per iteration.
  Backward, detach=True: grad_u = c_last * squash_bwd(s_last, grad_v), one write of grad_u.
  Backward, detach=False: the forward is recomputed (saving b_i, s_i and the softmax
  max/denominator in scratch), then reverse iterations T-1..1 each make one pass over u that
  computes g_c = <g_s_i, u>, the softmax backward and g_v_{i-1} = sum_l g_b_i u together
  (iteration 0 needs none: init_logits is a constant), then grad_u = sum_i c_i g_s_i +
  g_b_{i+1} v_i is written in one pass; u is read 2T-1 times (once when resident).
The small per-row state (logits (K, L), per-iteration s / g_s (K, d), ...) lives in global
scratch that the program writes and re-reads (L1/L2 resident); ``tl.debug_barrier()``
separates the phases because the reading thread need not be the writing one, and the forward
logits ping-pong between two slots so no pass reads and writes the same address.

Accumulation is in fp32 (fp64 when u is fp64); bf16/fp16 loads are cast right away.
No ``tl.dot`` in the routing iterations: K is tiny (< 16 rows) and fp32 must stay exact.

SEQ_AXIS (constexpr): 0 coupling softmax over the interests, 1 over the real positions, 2 over
all L positions with padded couplings zeroed afterwards (torch-rechub: the logits of padded
positions are updated and stay in the denominator).

Fused MIND (``_routing_mind_fwd_kernel`` / ``_routing_mind_bwd_kernel`` -> ``_routing_mind_fwd``
/ ``_routing_mind_bwd``): with the shared (d, d) map each program computes u = E_b·Wᵀ with one
``tl.dot`` (fp32 dots at ``fp32_dot_precision()``) and routes it in registers; the detached
backward computes grad_u, dE_b = grad_u·W and a per-program fp32 dW partial (two-stage
reduction, no atomics). Under the interpreter bf16/fp16 tiles are cast to fp32 before the dots
(CAST_F32), because the interpreter's half-precision dot is broken.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, dot_flags, gpu_tuned, num_sms, pow2, tl_acc_dtype

_NEG = tl.constexpr(-1.0e30)  # finite "-inf" for masked logits (no inf - inf = NaN)
_EPS = tl.constexpr(1e-9)  # squash epsilon, as the reference

# Tiling (elements of the u tile a program holds; tuned by compiling for sm_90 and reading
# register counts, not yet by timings). Shared layout: the whole row stays in registers when it
# has at most _RESIDENT_MAX elements (read from global memory once per kernel); otherwise, and
# always for the per-position layout (whose (K, L, d) rows do not fit), chunks of at most
# _CHUNK_MAX elements are streamed once per routing iteration. num_warps gives each thread
# about _ELEMS_PER_THREAD elements of the tile.
_RESIDENT_MAX = 8192
_CHUNK_MAX = 2048
_ELEMS_PER_THREAD = 16


# ----------------------------------------------------------------------------- helpers
# Index tensors kk, ll, dd place every per-row quantity in one index space:
#   per position: u tile (BK, BL, BD); (K, L) things (BK, BL, 1); (K, d) things (BK, 1, BD);
#                 per-interest scalars (BK, 1, 1); the sequence mask (1, BL, 1).
#   shared:       u tile (BL, BD) (indexed by lu, du); (K, L) things (BK, BL); (K, d) things
#                 (BK, BD); per-interest scalars (BK, 1); the sequence mask (1, BL).
# so the routing code below is written once: k is axis 0, l is axis 1, reductions keep dims.
# The shared tile is contracted one interest at a time (static_range over BLOCK_K): no (K, L, d)
# temporary, and its layout is not dragged along by the small (K, L) tensors.
@triton.jit
def _indices(PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
             BLOCK_D: tl.constexpr):
    ok = tl.arange(0, BLOCK_K)
    ol = tl.arange(0, BLOCK_L)
    od = tl.arange(0, BLOCK_D)
    if PER_POS:
        kk = ok[:, None, None]
        ll = ol[None, :, None]
        dd = od[None, None, :]
        lu = ll
        du = dd
    else:
        kk = ok[:, None]
        ll = ol[None, :]
        dd = od[None, :]
        lu = ol[:, None]
        du = od[None, :]
    return kk, ll, dd, lu, du


@triton.jit
def _zeros_kd(PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              ACC: tl.constexpr):
    if PER_POS:
        z = tl.zeros((BLOCK_K, 1, BLOCK_D), dtype=ACC)
    else:
        z = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    return z


@triton.jit
def _zeros_k(PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    if PER_POS:
        z = tl.zeros((BLOCK_K, 1, 1), dtype=ACC)
    else:
        z = tl.zeros((BLOCK_K, 1), dtype=ACC)
    return z


@triton.jit
def _zeros_u(PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
             BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    if PER_POS:
        z = tl.zeros((BLOCK_K, BLOCK_L, BLOCK_D), dtype=ACC)
    else:
        z = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    return z


@triton.jit
def _u_ptrs(row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS: tl.constexpr):
    """Pointers and mask of the u (or grad_u) tile at positions l0 .. l0 + BLOCK_L."""
    l = (l0 + lu).to(tl.int64)
    if PER_POS:
        ptrs = row + kk.to(tl.int64) * sUk + l * sUl + du
        msk = (kk < K) & (l < L) & (du < D)
    else:
        ptrs = row + l * sUl + du
        msk = (l < L) & (du < D)
    return ptrs, msk


@triton.jit
def _load_u(row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS: tl.constexpr, ACC: tl.constexpr):
    ptrs, msk = _u_ptrs(row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS)
    return tl.load(ptrs, mask=msk, other=0.0).to(ACC)  # bf16/fp16 -> fp32 at once


@triton.jit
def _dot_d(ut, w, kk, PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
           ACC: tl.constexpr):
    """out[k, l] = <u[k, l, :], w[k, :]> -> a (K, L) thing."""
    if PER_POS:
        out = tl.sum(ut * w, axis=2, keep_dims=True)
    else:
        out = tl.zeros((BLOCK_K, BLOCK_L), dtype=ACC)
        for k in tl.static_range(BLOCK_K):
            wk = tl.sum(tl.where(kk == k, w, 0.0), axis=0)  # (BD,)
            r = tl.sum(ut * wk[None, :], axis=1)  # (BL,)
            out = tl.where(kk == k, r[None, :], out)
    return out


@triton.jit
def _dot_l(w, ut, kk, PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
           ACC: tl.constexpr):
    """out[k, :] = sum_l w[k, l] u[k, l, :] -> a (K, d) thing."""
    if PER_POS:
        out = tl.sum(w * ut, axis=1, keep_dims=True)
    else:
        out = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
        for k in tl.static_range(BLOCK_K):
            wk = tl.sum(tl.where(kk == k, w, 0.0), axis=0)  # (BL,)
            r = tl.sum(wk[:, None] * ut, axis=0)  # (BD,)
            out = tl.where(kk == k, r[None, :], out)
    return out


@triton.jit
def _outer_acc(acc, a, bm, kk, PER_POS: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[k, l, :] += a[k, l] * bm[k, :] (per position) or acc[l, :] += sum_k (shared)."""
    if PER_POS:
        acc += a * bm
    else:
        for k in tl.static_range(BLOCK_K):
            ak = tl.sum(tl.where(kk == k, a, 0.0), axis=0)  # (BL,)
            bk = tl.sum(tl.where(kk == k, bm, 0.0), axis=0)  # (BD,)
            acc += ak[:, None] * bk[None, :]
    return acc


@triton.jit
def _sum_d(x, PER_POS: tl.constexpr):
    """Sum of a (K, d) thing over d, keeping dims -> per-interest scalars."""
    if PER_POS:
        r = tl.sum(x, axis=2, keep_dims=True)
    else:
        r = tl.sum(x, axis=1, keep_dims=True)
    return r


@triton.jit
def _softmax_row(mrow, l, L, SEQ_AXIS: tl.constexpr):
    """The positions of the sequence softmax: the real ones (SEQ_AXIS 1), or every l < L
    (SEQ_AXIS 2, torch-rechub: padded logits stay in the denominator)."""
    if SEQ_AXIS == 2:
        r = l < L
    else:
        r = mrow
    return r


@triton.jit
def _probs(bl, kvalid, mrow, m_run, inv_den, SEQ_AXIS: tl.constexpr):
    """Routing probabilities of a logits chunk bl (a (K, L) thing).

    interest axis: softmax over k (not masked by the sequence mask);
    sequence axis: exp(b - max) / den at the positions mrow (the caller passes
    ``_softmax_row``), 0 elsewhere (m_run, inv_den: per-interest scalars of the whole row).
    SEQ_AXIS: 0 interest, 1 sequence (real positions), 2 sequence (all positions).
    """
    if SEQ_AXIS:
        live = kvalid & mrow
        p = tl.where(live, tl.exp(tl.where(live, bl, _NEG) - m_run), 0.0) * inv_den
    else:
        x = tl.where(kvalid, bl, _NEG)
        mx = tl.max(x, axis=0, keep_dims=True)
        e = tl.where(kvalid, tl.exp(x - mx), 0.0)
        p = e / tl.sum(e, axis=0, keep_dims=True)
    return p


@triton.jit
def _inv_den(den):
    safe = tl.where(den > 0, den, 1.0)
    return tl.where(den > 0, 1.0 / safe, 0.0)


@triton.jit
def _squash(s, PER_POS: tl.constexpr):
    n = _sum_d(s * s, PER_POS)
    f = n / (1.0 + n) / tl.sqrt(n + _EPS)
    return f * s


@triton.jit
def _squash_bwd(s, gv, PER_POS: tl.constexpr):
    """g_s of v = squash(s) given g_v; finite at s = 0."""
    n = _sum_d(s * s, PER_POS)
    q = 1.0 / ((1.0 + n) * tl.sqrt(n + _EPS))
    f = n * q
    fp = q - n * q / (1.0 + n) - 0.5 * n * q / (n + _EPS)  # f'(n)
    sg = _sum_d(s * gv, PER_POS)
    return f * gv + (2.0 * fp * sg) * s


@triton.jit
def _opaque(x, L):
    """x, through a select the compiler cannot see through (L >= 1 here).

    Applied to the register-resident u tile once per routing iteration so that it is a
    loop-carried value: otherwise the layout pass hoists a conversion of the whole tile out of
    the loop (a second, replicated copy of u in registers) instead of converting the small
    per-interest vectors inside it.
    """
    return tl.where(L > 0, x, 0.0)


@triton.jit
def _mask_row(mask_row, l0, ll, L):
    l = l0 + ll
    return tl.load(mask_row + l, mask=l < L, other=0) != 0


@triton.jit
def _fwd_chunk(l0, ut, prev_slot, cur_slot, init_row, mask_row, v_prev, s_acc, m_run, den,
               it, kk, ll, kvalid, L, HAS_INIT: tl.constexpr, SEQ_AXIS: tl.constexpr,
               PER_POS: tl.constexpr, ONLINE: tl.constexpr, ACC: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One chunk of positions of routing iteration ``it``: logits update, then its share of s.

    ONLINE (several chunks): running max / denominator with rescaling, s_acc unnormalised;
    else the chunk is the whole row, (s_acc, m_run, den) are ignored on input and the
    returned s_acc is s.
    """
    l = l0 + ll
    mrow = _mask_row(mask_row, l0, ll, L)
    kl_off = kk * L + l
    kl_msk = kvalid & (l < L)
    # b_it = b_{it-1} + <u, v_{it-1}>  (v_prev = 0 and b from init at it == 0)
    bl = tl.load(prev_slot + kl_off, mask=kl_msk & (it > 0), other=0.0)
    if HAS_INIT:
        bl += tl.load(init_row + kl_off, mask=kl_msk & (it == 0), other=0.0)
    bl = bl + _dot_d(ut, v_prev, kk, PER_POS, BLOCK_K, BLOCK_L, ACC)
    tl.store(cur_slot + kl_off, bl, mask=kl_msk)
    if SEQ_AXIS:  # softmax over the real positions (1) or all of them (2); c = 0 at padded
        live = kvalid & _softmax_row(mrow, l, L, SEQ_AXIS)
        x = tl.where(live, bl, _NEG)
        if ONLINE:
            m_new = tl.maximum(m_run, tl.max(x, axis=1, keep_dims=True))
            alpha = tl.exp(m_run - m_new)
            e = tl.where(live, tl.exp(x - m_new), 0.0)
            den = den * alpha + tl.sum(e, axis=1, keep_dims=True)
            s_acc = s_acc * alpha + _dot_l(tl.where(mrow, e, 0.0), ut, kk, PER_POS, BLOCK_K,
                                           BLOCK_D, ACC)
            m_run = m_new
        else:
            # normalise before contracting: no per-interest scalar from a reduction over l
            # meets a (K, d) tensor (that drags the layout of u along on the GPU)
            m_run = tl.max(x, axis=1, keep_dims=True)
            e = tl.where(live, tl.exp(x - m_run), 0.0)
            den = tl.sum(e, axis=1, keep_dims=True)
            s_acc = _dot_l(tl.where(mrow, e, 0.0) * _inv_den(den), ut, kk, PER_POS, BLOCK_K,
                           BLOCK_D, ACC)
    else:
        c = _probs(bl, kvalid, mrow, m_run, den, False) * mrow.to(ACC)
        if ONLINE:
            s_acc = s_acc + _dot_l(c, ut, kk, PER_POS, BLOCK_K, BLOCK_D, ACC)
        else:
            s_acc = _dot_l(c, ut, kk, PER_POS, BLOCK_K, BLOCK_D, ACC)
    return s_acc, m_run, den


@triton.jit
def _fwd_iterations(u_row, u_res, mask_row, init_row, blog_row, sall_row, mall_row, dall_row,
                    kk, ll, dd, lu, du, K, L, D, sUk, sUl,
                    KL, PINGPONG: tl.constexpr, ITERS: tl.constexpr, HAS_INIT: tl.constexpr,
                    SEQ_AXIS: tl.constexpr, PER_POS: tl.constexpr, ONE_CHUNK: tl.constexpr,
                    SAVE_ALL: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """The T routing iterations of one row.

    Logits of iteration it are written to slot it (a (K, L) block of ``blog_row``), or with
    PINGPONG to slot it % 2 (two slots, never read and written in the same pass).
    SAVE_ALL also stores s_it ((T, K, D)) and, on the sequence axis, the running max /
    denominator ((T, K)) for the backward.
    Returns (s, v, m_run, den) of the last iteration.
    """
    kvalid = kk < K
    kd_off = kk * D + dd
    kd_msk = kvalid & (dd < D)
    v_prev = _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC)
    s = _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC)
    m_run = _zeros_k(PER_POS, BLOCK_K, ACC) + _NEG
    den = _zeros_k(PER_POS, BLOCK_K, ACC)
    for it in range(ITERS):
        s_acc = _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC)
        m_run = _zeros_k(PER_POS, BLOCK_K, ACC) + _NEG
        den = _zeros_k(PER_POS, BLOCK_K, ACC)
        if PINGPONG:
            prev_slot = blog_row + ((it + 1) % 2) * KL  # only read when it > 0
            cur_slot = blog_row + (it % 2) * KL
        else:
            prev_slot = blog_row + (it - 1) * KL  # only read when it > 0
            cur_slot = blog_row + it * KL
        if ONE_CHUNK:  # no loop: nothing is carried from chunk to chunk
            s_acc, m_run, den = _fwd_chunk(
                0, u_res, prev_slot, cur_slot, init_row, mask_row, v_prev, s_acc, m_run, den,
                it, kk, ll, kvalid, L, HAS_INIT, SEQ_AXIS, PER_POS, False, ACC, BLOCK_K,
                BLOCK_L, BLOCK_D)
            u_res = _opaque(u_res, L)
        else:
            for l0 in range(0, L, BLOCK_L):
                ut = _load_u(u_row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS, ACC)
                s_acc, m_run, den = _fwd_chunk(
                    l0, ut, prev_slot, cur_slot, init_row, mask_row, v_prev, s_acc, m_run, den,
                    it, kk, ll, kvalid, L, HAS_INIT, SEQ_AXIS, PER_POS, True, ACC, BLOCK_K,
                    BLOCK_L, BLOCK_D)
        s = s_acc
        if SEQ_AXIS:
            if not ONE_CHUNK:
                s = s_acc * _inv_den(den)
        v_prev = _squash(s, PER_POS)
        if SAVE_ALL:
            tl.store(sall_row + it * K * D + kd_off, s, mask=kd_msk)
            if SEQ_AXIS:
                tl.store(mall_row + it * K + kk, m_run, mask=kvalid)
                tl.store(dall_row + it * K + kk, den, mask=kvalid)
        tl.debug_barrier()  # b of this iteration is re-read (maybe by other threads) next
    return s, v_prev, m_run, den, u_res


@triton.jit
def _bwd_chunk(l0, ut, blog_i, gb_in, gb_out, mask_row, gs, m_i, inv_i, g_v_next, ssum, pu_pad,
               kk, ll, kvalid, L, SEQ_AXIS: tl.constexpr, PER_POS: tl.constexpr,
               ONLINE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One chunk of reverse iteration i: g_c = <g_s_i, u> (masked), softmax backward,
    g_b_i = g_b_{i+1} + g_p stored to gb_out, and its share of g_v_{i-1} = sum_l g_b_i u.

    Sequence axis with ONLINE (several chunks): gb_out gets G = g_b_{i+1} + p g_c and ssum the
    row sums of p g_c; the caller finishes g_b_i = G - ssum p and g_v -= ssum sum_l p u,
    where sum_l p u = s_i + pu_pad (pu_pad: the padded positions' share, SEQ_AXIS 2 only).
    """
    l = l0 + ll
    mrow = _mask_row(mask_row, l0, ll, L)
    kl_off = kk * L + l
    kl_msk = kvalid & (l < L)
    bl = tl.load(blog_i + kl_off, mask=kl_msk, other=0.0)
    p = _probs(bl, kvalid, _softmax_row(mrow, l, L, SEQ_AXIS), m_i, inv_i, SEQ_AXIS)
    g_c = _dot_d(ut, gs, kk, PER_POS, BLOCK_K, BLOCK_L, ACC) * mrow.to(ACC)
    # gradient w.r.t. b_{i+1} (slot T-1 is zeros: none after the last iteration)
    g_b = tl.load(gb_in + kl_off, mask=kl_msk, other=0.0)
    pg = p * g_c
    if SEQ_AXIS:
        if ONLINE:
            ssum += tl.sum(pg, axis=1, keep_dims=True)
            g_b = g_b + pg
            if SEQ_AXIS == 2:
                pu_pad += _dot_l(tl.where(mrow, 0.0, p), ut, kk, PER_POS, BLOCK_K, BLOCK_D, ACC)
        else:
            g_b = g_b + pg - p * tl.sum(pg, axis=1, keep_dims=True)
    else:
        g_b = g_b + pg - p * tl.sum(pg, axis=0, keep_dims=True)
    tl.store(gb_out + kl_off, g_b, mask=kl_msk)
    g_v_next += _dot_l(g_b, ut, kk, PER_POS, BLOCK_K, BLOCK_D, ACC)
    return g_v_next, ssum, pu_pad


@triton.jit
def _iter_norm(mall_row, dall_row, i, kk, kvalid, K, SEQ_AXIS: tl.constexpr,
               PER_POS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """(max, 1/denominator) of iteration i's softmax over the sequence axis, as the forward
    recompute saved them; zeros (unused) for the softmax over interests."""
    if SEQ_AXIS:
        m_i = tl.load(mall_row + i * K + kk, mask=kvalid, other=0.0)
        inv_i = _inv_den(tl.load(dall_row + i * K + kk, mask=kvalid, other=0.0))
    else:
        m_i = _zeros_k(PER_POS, BLOCK_K, ACC)
        inv_i = m_i
    return m_i, inv_i


@triton.jit
def _reverse_head(i, g_v, sall_row, gs_row, mall_row, dall_row, kk, kvalid, kd_off, kd_msk, K,
                  KD, SEQ_AXIS: tl.constexpr, PER_POS: tl.constexpr, BLOCK_K: tl.constexpr,
                  ACC: tl.constexpr):
    """Reverse iteration i before its pass over u: g_s_i = squash_bwd(s_i, g_v), stored to its
    scratch slot. -> (s_i, g_s_i, max_i, 1/den_i)."""
    s_i = tl.load(sall_row + i * KD + kd_off, mask=kd_msk, other=0.0)
    gs = _squash_bwd(s_i, g_v, PER_POS)
    tl.store(gs_row + i * KD + kd_off, gs, mask=kd_msk)
    m_i, inv_i = _iter_norm(mall_row, dall_row, i, kk, kvalid, K, SEQ_AXIS, PER_POS, BLOCK_K,
                            ACC)
    return s_i, gs, m_i, inv_i


@triton.jit
def _reverse_resident(u_res, g_v, blog_row, sall_row, mall_row, dall_row, gs_row, gb_row,
                      mask_row, kk, ll, kvalid, kd_off, kd_msk, K, L, KL, KD,
                      ITERS: tl.constexpr, SEQ_AXIS: tl.constexpr, PER_POS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Reverse iterations T-1 .. 1 with u register-resident (one chunk: g_c and the next g_v
    from one pass over u each; iteration 0 needs none, its logits are constant), then
    g_s_0 stored. Shared by ``_routing_bwd_kernel`` (ONE_CHUNK) and the fused MIND backward.
    -> u_res (kept live through ``_opaque``)."""
    for ii in range(ITERS - 1):
        i = ITERS - 1 - ii
        s_i, gs, m_i, inv_i = _reverse_head(i, g_v, sall_row, gs_row, mall_row, dall_row, kk,
                                            kvalid, kd_off, kd_msk, K, KD, SEQ_AXIS, PER_POS,
                                            BLOCK_K, ACC)
        g_v_next, ssum, pu_pad = _bwd_chunk(
            0, u_res, blog_row + i * KL, gb_row + i * KL, gb_row + (i - 1) * KL, mask_row, gs,
            m_i, inv_i, _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC), _zeros_k(PER_POS, BLOCK_K, ACC),
            _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC), kk, ll, kvalid, L, SEQ_AXIS, PER_POS,
            False, ACC, BLOCK_K, BLOCK_L, BLOCK_D)
        u_res = _opaque(u_res, L)
        tl.debug_barrier()
        g_v = g_v_next
    s_0 = tl.load(sall_row + kd_off, mask=kd_msk, other=0.0)
    tl.store(gs_row + kd_off, _squash_bwd(s_0, g_v, PER_POS), mask=kd_msk)
    tl.debug_barrier()
    return u_res


@triton.jit
def _grad_u_chunk(l, mrow, blog_row, sall_row, mall_row, dall_row, gs_row, gb_row, kk, kvalid,
                  kd_off, kd_msk, kl_off, kl_msk, K, L, KL, KD, ITERS: tl.constexpr,
                  SEQ_AXIS: tl.constexpr, PER_POS: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_u of one chunk of positions = sum_i c_i[k,l] g_s_i[k,:] + g_b_{i+1}[k,l] v_i[k,:]
    (u's layout, ACC), from the scratch the reverse pass filled (g_b slot T-1 holds zeros)."""
    mf = mrow.to(ACC)
    acc = _zeros_u(PER_POS, BLOCK_K, BLOCK_L, BLOCK_D, ACC)
    for i in range(ITERS):
        m_i, inv_i = _iter_norm(mall_row, dall_row, i, kk, kvalid, K, SEQ_AXIS, PER_POS,
                                BLOCK_K, ACC)
        bl = tl.load(blog_row + i * KL + kl_off, mask=kl_msk, other=0.0)
        c = _probs(bl, kvalid, _softmax_row(mrow, l, L, SEQ_AXIS), m_i, inv_i, SEQ_AXIS) * mf
        gs_i = tl.load(gs_row + i * KD + kd_off, mask=kd_msk, other=0.0)
        g_b = tl.load(gb_row + i * KL + kl_off, mask=kl_msk, other=0.0)  # 0 at i = T-1
        v_i = _squash(tl.load(sall_row + i * KD + kd_off, mask=kd_msk, other=0.0), PER_POS)
        acc = _outer_acc(acc, c, gs_i, kk, PER_POS, BLOCK_K)
        acc = _outer_acc(acc, g_b, v_i, kk, PER_POS, BLOCK_K)
    return acc


@triton.jit
def _fwd_epilogue(v_ptr, s_ptr, c_row, blog_row, mask_row, b, s, v, m_run, den, kk, ll, dd,
                  K, L, D, ITERS: tl.constexpr, SEQ_AXIS: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_L: tl.constexpr):
    """Store v (in v_ptr's dtype) and s_last of row b, then c_last from the last iteration's
    logits (ping-pong slot (T-1) % 2), zero at padded positions."""
    kvalid = kk < K
    kd_off = b * K * D + kk * D + dd
    kd_msk = kvalid & (dd < D)
    tl.store(v_ptr + kd_off, v.to(v_ptr.dtype.element_ty), mask=kd_msk)
    tl.store(s_ptr + kd_off, s, mask=kd_msk)
    inv_den = _inv_den(den)
    last_slot = blog_row + ((ITERS - 1) % 2) * K * L
    for l0 in range(0, L, BLOCK_L):
        l = l0 + ll
        mrow = _mask_row(mask_row, l0, ll, L)
        kl_off = kk * L + l
        kl_msk = kvalid & (l < L)
        bl = tl.load(last_slot + kl_off, mask=kl_msk, other=0.0)
        c = _probs(bl, kvalid, _softmax_row(mrow, l, L, SEQ_AXIS), m_run, inv_den,
                   SEQ_AXIS) * mrow.to(ACC)
        tl.store(c_row + kl_off, c, mask=kl_msk)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _routing_fwd_kernel(u_ptr, mask_ptr, init_ptr, v_ptr, c_ptr, s_ptr, blog_ptr,
                        K, L, D, sUb, sUk, sUl,
                        ITERS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_AXIS: tl.constexpr,
                        PER_POS: tl.constexpr, ONE_CHUNK: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per batch row b.

    u: see module docstring; mask_ptr: (B, L) uint8; init_ptr: (B, K, L) ACC (HAS_INIT);
    v_ptr: (B, K, D) u's dtype; c_ptr: (B, K, L) ACC; s_ptr: (B, K, D) ACC;
    blog_ptr: (B, 2, K, L) ACC scratch (routing logits, ping-pong).
    """
    b = tl.program_id(0).to(tl.int64)
    kk, ll, dd, lu, du = _indices(PER_POS, BLOCK_K, BLOCK_L, BLOCK_D)
    u_row = u_ptr + b * sUb
    mask_row = mask_ptr + b * L
    init_row = init_ptr + b * K * L
    c_row = c_ptr + b * K * L
    blog_row = blog_ptr + b * 2 * K * L
    if ONE_CHUNK:
        u_res = _load_u(u_row, 0, kk, lu, du, K, L, D, sUk, sUl, PER_POS, ACC)
    else:
        u_res = 0.0  # unused
    s, v, m_run, den, u_res = _fwd_iterations(
        u_row, u_res, mask_row, init_row, blog_row, c_row, c_row, c_row,
        kk, ll, dd, lu, du, K, L, D, sUk, sUl, K * L, True,
        ITERS, HAS_INIT, SEQ_AXIS, PER_POS, ONE_CHUNK, False, ACC, BLOCK_K, BLOCK_L, BLOCK_D)
    _fwd_epilogue(v_ptr, s_ptr, c_row, blog_row, mask_row, b, s, v, m_run, den, kk, ll, dd, K, L,
                  D, ITERS, SEQ_AXIS, ACC, BLOCK_L)


@triton.jit
def _routing_bwd_kernel(gv_ptr, u_ptr, mask_ptr, init_ptr, c_ptr, s_ptr, gu_ptr,
                        blog_ptr, sall_ptr, mall_ptr, dall_ptr, gs_ptr, gb_ptr,
                        K, L, D, sUb, sUk, sUl,
                        ITERS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_AXIS: tl.constexpr,
                        PER_POS: tl.constexpr, DETACH: tl.constexpr, ONE_CHUNK: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """One program per batch row b; grad_u (u's layout) is written exactly once.

    DETACH: grad_u = c_last * squash_bwd(s_last, grad_v) (u unused).
    Else: recompute the forward saving b_i (B,T,K,L), s_i (B,T,K,D) and, on the sequence axis,
    max/den (B,T,K) in scratch; run the reverse iterations T-1..1 (one pass over u each: g_c
    and the next g_v share it) saving g_s_i (B,T,K,D) and g_b_{i+1} (B,T,K,L; slot T-1 zeros);
    then write grad_u = sum_i c_i g_s_i + g_b_{i+1} squash(s_i) in one pass.
    gv_ptr: (B, K, D); gu_ptr: u's layout, summed over k when shared.
    """
    b = tl.program_id(0).to(tl.int64)
    kk, ll, dd, lu, du = _indices(PER_POS, BLOCK_K, BLOCK_L, BLOCK_D)
    kvalid = kk < K
    kd_off = kk * D + dd
    kd_msk = kvalid & (dd < D)
    u_row = u_ptr + b * sUb
    gu_row = gu_ptr + b * sUb
    mask_row = mask_ptr + b * L
    gv = tl.load(gv_ptr + b * K * D + kd_off, mask=kd_msk, other=0.0).to(ACC)
    if DETACH:
        s = tl.load(s_ptr + b * K * D + kd_off, mask=kd_msk, other=0.0).to(ACC)
        gs = _squash_bwd(s, gv, PER_POS)
        c_row = c_ptr + b * K * L
        for l0 in range(0, L, BLOCK_L):
            l = l0 + ll
            kl_msk = kvalid & (l < L)
            c = tl.load(c_row + kk * L + l, mask=kl_msk, other=0.0).to(ACC)
            acc = _outer_acc(_zeros_u(PER_POS, BLOCK_K, BLOCK_L, BLOCK_D, ACC), c, gs, kk,
                             PER_POS, BLOCK_K)
            ptrs, msk = _u_ptrs(gu_row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS)
            tl.store(ptrs, acc.to(gu_ptr.dtype.element_ty), mask=msk)
    else:
        KL = K * L
        KD = K * D
        blog_row = blog_ptr + b * ITERS * KL
        sall_row = sall_ptr + b * ITERS * KD
        mall_row = mall_ptr + b * ITERS * K
        dall_row = dall_ptr + b * ITERS * K
        gs_row = gs_ptr + b * ITERS * KD
        gb_row = gb_ptr + b * ITERS * KL
        init_row = init_ptr + b * KL
        if ONE_CHUNK:
            u_res = _load_u(u_row, 0, kk, lu, du, K, L, D, sUk, sUl, PER_POS, ACC)
        else:
            u_res = 0.0  # unused
        # ---- forward recompute, saving every iteration
        s_last, v_last, m_last, den_last, u_res = _fwd_iterations(
            u_row, u_res, mask_row, init_row, blog_row, sall_row, mall_row, dall_row,
            kk, ll, dd, lu, du, K, L, D, sUk, sUl, KL, False,
            ITERS, HAS_INIT, SEQ_AXIS, PER_POS, ONE_CHUNK, True, ACC, BLOCK_K, BLOCK_L, BLOCK_D)
        # ---- reverse iterations T-1 .. 1 (iteration 0 needs no pass over u: init is constant)
        if ONE_CHUNK:
            u_res = _reverse_resident(u_res, gv, blog_row, sall_row, mall_row, dall_row, gs_row,
                                      gb_row, mask_row, kk, ll, kvalid, kd_off, kd_msk, K, L,
                                      KL, KD, ITERS, SEQ_AXIS, PER_POS, ACC, BLOCK_K, BLOCK_L,
                                      BLOCK_D)
        else:
            g_v = gv
            for ii in range(ITERS - 1):
                i = ITERS - 1 - ii
                s_i, gs, m_i, inv_i = _reverse_head(i, g_v, sall_row, gs_row, mall_row,
                                                    dall_row, kk, kvalid, kd_off, kd_msk, K, KD,
                                                    SEQ_AXIS, PER_POS, BLOCK_K, ACC)
                g_v_next = _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC)
                ssum = _zeros_k(PER_POS, BLOCK_K, ACC)
                pu_pad = _zeros_kd(PER_POS, BLOCK_K, BLOCK_D, ACC)
                for l0 in range(0, L, BLOCK_L):
                    ut = _load_u(u_row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS, ACC)
                    g_v_next, ssum, pu_pad = _bwd_chunk(
                        l0, ut, blog_row + i * KL, gb_row + i * KL, gb_row + (i - 1) * KL,
                        mask_row, gs, m_i, inv_i, g_v_next, ssum, pu_pad, kk, ll, kvalid, L,
                        SEQ_AXIS, PER_POS, True, ACC, BLOCK_K, BLOCK_L, BLOCK_D)
                if SEQ_AXIS:
                    # g_b_i = G - ssum * p_i, and sum_l p_i u = s_i (+ the padded share)
                    g_v_next -= ssum * (s_i + pu_pad)
                    tl.debug_barrier()
                    for l0 in range(0, L, BLOCK_L):
                        l = l0 + ll
                        mrow = _mask_row(mask_row, l0, ll, L)
                        kl_off = kk * L + l
                        kl_msk = kvalid & (l < L)
                        bl = tl.load(blog_row + i * KL + kl_off, mask=kl_msk, other=0.0)
                        p = _probs(bl, kvalid, _softmax_row(mrow, l, L, SEQ_AXIS), m_i,
                                   inv_i, SEQ_AXIS)
                        gbp = gb_row + (i - 1) * KL + kl_off
                        g_b = tl.load(gbp, mask=kl_msk, other=0.0)
                        tl.store(gbp, g_b - ssum * p, mask=kl_msk)
                tl.debug_barrier()
                g_v = g_v_next
            s_0 = tl.load(sall_row + kd_off, mask=kd_msk, other=0.0)
            tl.store(gs_row + kd_off, _squash_bwd(s_0, g_v, PER_POS), mask=kd_msk)
            tl.debug_barrier()
        # ---- grad_u = sum_i c_i[k,l] g_s_i[k,:] + g_b_{i+1}[k,l] v_i[k,:]
        for l0 in range(0, L, BLOCK_L):
            l = l0 + ll
            kl_msk = kvalid & (l < L)
            acc = _grad_u_chunk(l, _mask_row(mask_row, l0, ll, L), blog_row, sall_row, mall_row,
                                dall_row, gs_row, gb_row, kk, kvalid, kd_off, kd_msk, kk * L + l,
                                kl_msk, K, L, KL, KD, ITERS, SEQ_AXIS, PER_POS, ACC, BLOCK_K,
                                BLOCK_L, BLOCK_D)
            ptrs, msk = _u_ptrs(gu_row, l0, kk, lu, du, K, L, D, sUk, sUl, PER_POS)
            tl.store(ptrs, acc.to(gu_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- fused MIND
# MIND's shared (d, d) map fused into the routing kernels: each program computes its row's
# u = E_b · Wᵀ with one tl.dot (u never goes to global memory), and the detached backward turns
# grad_u into dE_b = grad_u · W and its share of dW = Σ_b grad_uᵀ · E_b with two more dots.
@triton.jit
def _mind_e_tile(e_ptr, mask_ptr, b, lu, du, L, D, SEQ_AXIS: tl.constexpr):
    """E_b (BLOCK_L, BLOCK_D) in its own dtype; zero at padded positions (except SEQ_AXIS 2,
    torch-rechub, whose padded positions are data) and outside (L, D)."""
    keep = lu < L
    if SEQ_AXIS != 2:
        keep = keep & (tl.load(mask_ptr + b * L + lu, mask=lu < L, other=0) != 0)
    return tl.load(e_ptr + b * L * D + lu * D + du, mask=keep & (du < D), other=0.0)


@triton.jit
def _routing_mind_fwd_kernel(e_ptr, w_ptr, mask_ptr, init_ptr, v_ptr, c_ptr, s_ptr, blog_ptr,
                             K, L, D,
                             ITERS: tl.constexpr, HAS_INIT: tl.constexpr,
                             SEQ_AXIS: tl.constexpr, CAST_F32: tl.constexpr,
                             PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """One program per batch row b: u = E_b · Wᵀ (tl.dot, fp32 accumulation), then the
    routing iterations on the register-resident u (as ``_routing_fwd_kernel``, ONE_CHUNK).

    e_ptr: (B, L, D); w_ptr: (D, D) nn.Linear orientation (u = e · wᵀ); other pointers as
    ``_routing_fwd_kernel``. CAST_F32: half tiles go to fp32 before the dot (interpreter).
    """
    b = tl.program_id(0).to(tl.int64)
    kk, ll, dd, lu, du = _indices(False, BLOCK_K, BLOCK_L, BLOCK_D)
    e = _mind_e_tile(e_ptr, mask_ptr, b, lu, du, L, D, SEQ_AXIS)
    ii = tl.arange(0, BLOCK_D)[:, None]  # input feature
    oo = tl.arange(0, BLOCK_D)[None, :]  # output feature
    wt = tl.load(w_ptr + oo * D + ii, mask=(ii < D) & (oo < D), other=0.0)  # Wᵀ (in, out)
    if CAST_F32:
        e = e.to(tl.float32)
        wt = wt.to(tl.float32)
    u_res = tl.dot(e, wt, input_precision=PREC)  # (BLOCK_L, BLOCK_D) fp32
    mask_row = mask_ptr + b * L
    init_row = init_ptr + b * K * L
    c_row = c_ptr + b * K * L
    blog_row = blog_ptr + b * 2 * K * L
    s, v, m_run, den, u_res = _fwd_iterations(
        e_ptr, u_res, mask_row, init_row, blog_row, c_row, c_row, c_row,
        kk, ll, dd, lu, du, K, L, D, 0, D, K * L, True,
        ITERS, HAS_INIT, SEQ_AXIS, False, True, False, tl.float32, BLOCK_K, BLOCK_L, BLOCK_D)
    _fwd_epilogue(v_ptr, s_ptr, c_row, blog_row, mask_row, b, s, v, m_run, den, kk, ll, dd, K, L,
                  D, ITERS, SEQ_AXIS, tl.float32, BLOCK_L)


@triton.jit
def _mind_bwd_full_row(u_res, gv, mask_row, init_row, blog_row, sall_row, mall_row, dall_row,
                       gs_row, gb_row, kk, ll, dd, lu, du, K, L, D,
                       ITERS: tl.constexpr, HAS_INIT: tl.constexpr, SEQ_AXIS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_u (BLOCK_L, BLOCK_D) of one row through every routing iteration, u register-resident
    (shared layout): the same helpers as ``_routing_bwd_kernel``'s non-detached ONE_CHUNK
    branch (``_fwd_iterations``, ``_reverse_resident``, ``_grad_u_chunk``), returning grad_u
    instead of storing it. Scratch rows as there; gb_row's slot ITERS-1 must hold zeros."""
    KL = K * L
    KD = K * D
    kvalid = kk < K
    kd_off = kk * D + dd
    kd_msk = kvalid & (dd < D)
    s_last, v_last, m_last, den_last, u_res = _fwd_iterations(
        gs_row, u_res, mask_row, init_row, blog_row, sall_row, mall_row, dall_row,
        kk, ll, dd, lu, du, K, L, D, 0, D, KL, False,
        ITERS, HAS_INIT, SEQ_AXIS, False, True, True, tl.float32, BLOCK_K, BLOCK_L, BLOCK_D)
    u_res = _reverse_resident(u_res, gv, blog_row, sall_row, mall_row, dall_row, gs_row, gb_row,
                              mask_row, kk, ll, kvalid, kd_off, kd_msk, K, L, KL, KD, ITERS,
                              SEQ_AXIS, False, tl.float32, BLOCK_K, BLOCK_L, BLOCK_D)
    acc = _grad_u_chunk(ll, _mask_row(mask_row, 0, ll, L), blog_row, sall_row, mall_row,
                        dall_row, gs_row, gb_row, kk, kvalid, kd_off, kd_msk, kk * L + ll,
                        kvalid & (ll < L), K, L, KL, KD, ITERS, SEQ_AXIS, False, tl.float32,
                        BLOCK_K, BLOCK_L, BLOCK_D)
    tl.debug_barrier()  # the scratch is the next row's
    return acc


@triton.jit
def _routing_mind_bwd_kernel(gv_ptr, e_ptr, w_ptr, mask_ptr, c_ptr, s_ptr, de_ptr, dwp_ptr,
                             init_ptr, blog_ptr, sall_ptr, mall_ptr, dall_ptr, gs_ptr, gb_ptr,
                             B, K, L, D,
                             ITERS: tl.constexpr, HAS_INIT: tl.constexpr, DETACH: tl.constexpr,
                             SEQ_AXIS: tl.constexpr, CAST_F32: tl.constexpr,
                             PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """Backward of the fused MIND routing; program p takes rows p, p + P, ...

    DETACH: grad_u_b = Σ_k c_last[b,k,:]ᵀ squash_bwd(s_last[b,k], grad_v[b,k]) (BLOCK_L, BLOCK_D);
    else grad_u_b through every iteration (``_mind_bwd_full_row``: u_b = E_b·Wᵀ recomputed by
    tl.dot, the iterations recomputed in the program's own scratch rows (P, T, K, L / D)).
    Then dE_b = grad_u_b · W written in E's dtype (zero at padded positions except for the
    torch-rechub softmax without detach, SEQ_AXIS 2), and
    dW_p = Σ_{b of p} grad_u_bᵀ · E_b accumulated in fp32 registers, written once to
    dwp_ptr[p] (P, D, D): the caller sums the P partials (no atomics, deterministic).
    grad_u meets the dots in E's dtype (as the unfused path's GEMMs see it), fp32 under
    CAST_F32.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    p64 = pid.to(tl.int64)
    kk, ll, dd, lu, du = _indices(False, BLOCK_K, BLOCK_L, BLOCK_D)
    kvalid = kk < K
    kd_msk = kvalid & (dd < D)
    kl_msk = kvalid & (ll < L)
    oo = tl.arange(0, BLOCK_D)[:, None]  # output feature (rows of W)
    ii = tl.arange(0, BLOCK_D)[None, :]  # input feature
    dw = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    zero64 = pid.to(tl.int64) * 0
    for row in range(pid, B, nprog):
        b = zero64 + row  # int64 before pointer math
        gv = tl.load(gv_ptr + b * K * D + kk * D + dd, mask=kd_msk, other=0.0).to(tl.float32)
        e = _mind_e_tile(e_ptr, mask_ptr, b, lu, du, L, D, SEQ_AXIS)
        if CAST_F32:
            e = e.to(tl.float32)
        if DETACH:
            s = tl.load(s_ptr + b * K * D + kk * D + dd, mask=kd_msk, other=0.0)
            gs = _squash_bwd(s, gv, False)
            c = tl.load(c_ptr + b * K * L + kk * L + ll, mask=kl_msk, other=0.0)
            gu = _outer_acc(tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32), c, gs, kk, False,
                            BLOCK_K)
        else:
            iw = tl.arange(0, BLOCK_D)[:, None]  # input feature
            ow = tl.arange(0, BLOCK_D)[None, :]  # output feature
            wt = tl.load(w_ptr + ow * D + iw, mask=(iw < D) & (ow < D), other=0.0)  # Wᵀ
            if CAST_F32:
                wt = wt.to(tl.float32)
            u_res = tl.dot(e, wt, input_precision=PREC)  # (BLOCK_L, BLOCK_D) fp32
            KL = K * L
            KD = K * D
            gu = _mind_bwd_full_row(
                u_res, gv, mask_ptr + b * L, init_ptr + b * KL, blog_ptr + p64 * ITERS * KL,
                sall_ptr + p64 * ITERS * KD, mall_ptr + p64 * ITERS * K,
                dall_ptr + p64 * ITERS * K, gs_ptr + p64 * ITERS * KD, gb_ptr + p64 * ITERS * KL,
                kk, ll, dd, lu, du, K, L, D, ITERS, HAS_INIT, SEQ_AXIS, BLOCK_K, BLOCK_L,
                BLOCK_D)
        gu_op = gu.to(e.dtype)  # deliberate: bf16/fp16 operands on tensor cores
        # dW first, so that E is dead before W is loaded (fewer tiles live at once)
        dw = tl.dot(tl.trans(gu_op), e, dw, input_precision=PREC)  # accumulate in place
        # W (out, in) re-read per row from L1/L2 rather than held across the loop: with the dW
        # accumulator live, a loop-carried W tile pushes fp32 (tf32x3) past 255 registers
        w = tl.load(w_ptr + oo * D + ii, mask=(oo < D) & (ii < D), other=0.0)
        if CAST_F32:
            w = w.to(tl.float32)
        de = tl.dot(gu_op, w, input_precision=PREC)  # (BLOCK_L, BLOCK_D)
        tl.store(de_ptr + b * L * D + lu * D + du, de.to(de_ptr.dtype.element_ty),
                 mask=(lu < L) & (du < D))
    tl.store(dwp_ptr + pid.to(tl.int64) * D * D + oo * D + ii, dw, mask=(oo < D) & (ii < D))


# ----------------------------------------------------------------------------- launchers
def _blocks(K: int, L: int, d: int, per_pos: bool, block_l: Optional[int]):
    """(BLOCK_K, BLOCK_L, BLOCK_D, ONE_CHUNK, num_warps)."""
    BK = pow2(K)
    BD = pow2(d)
    per_l = BK * BD if per_pos else BD
    full = pow2(L)
    if block_l is not None:  # testing hook: force a chunk size
        BL = min(pow2(block_l), full)
    elif not per_pos and full * per_l <= _RESIDENT_MAX:
        BL = full
    else:
        BL = max(1, min(full, _CHUNK_MAX // per_l))
    one = BL >= L
    elems = BL * per_l
    num_warps = max(4, min(16, elems // (32 * _ELEMS_PER_THREAD)))
    return BK, BL, BD, one, num_warps


def _layout(u_shape, num_interests: int, per_pos: bool):
    """(B, K, L, d, sUb, sUk, sUl) from u's shape."""
    if per_pos:
        L, B, K, d = u_shape
        if K != num_interests:
            raise ValueError(f"u: per-position u_hat (L, B, K, d) has K={K}, "
                             f"num_interests={num_interests}")
        return B, K, L, d, K * d, d, B * K * d
    B, L, d = u_shape
    return B, num_interests, L, d, L * d, 0, d


def _mask_u8(mask: torch.Tensor) -> torch.Tensor:
    """The (B, L) sequence mask as the kernels read it: contiguous uint8 bytes of a bool."""
    return (mask if mask.dtype == torch.bool else mask != 0).contiguous().view(torch.uint8)


def _seq_mode(seq_axis: bool, seq_all: bool) -> int:
    """SEQ_AXIS constexpr: 0 interest axis, 1 sequence (real positions), 2 sequence over all L
    positions (torch-rechub)."""
    return 2 if seq_all else (1 if seq_axis else 0)


def _routing_fwd(u: torch.Tensor, mask: torch.Tensor, init_logits: Optional[torch.Tensor],
                 num_interests: int, iters: int, seq_axis: bool, seq_all: bool = False, *,
                 block_l: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Capsule routing forward.

    u: (B, L, d) shared or (L, B, K, d) per position; mask: (B, L) bool; init_logits: (B, K, L)
    or None; seq_all: the sequence softmax over all L positions (torch-rechub). Returns v (B, K, d) in u's dtype, c_last (B, K, L) and s_last (B, K, d) in fp32
    (fp64 when u is fp64).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    per_pos = u.dim() == 4
    u = u.contiguous()
    B, K, L, d, sUb, sUk, sUl = _layout(tuple(u.shape), num_interests, per_pos)
    acc = acc_dtype(u.dtype)
    dev = u.device
    if B == 0 or L == 0 or d == 0 or K == 0:  # nothing routed: zero interests
        return (torch.zeros(B, K, d, dtype=u.dtype, device=dev),
                torch.zeros(B, K, L, dtype=acc, device=dev),
                torch.zeros(B, K, d, dtype=acc, device=dev))
    # every element of the outputs is written by the kernel
    v = torch.empty(B, K, d, dtype=u.dtype, device=dev)
    c_last = torch.empty(B, K, L, dtype=acc, device=dev)
    s_last = torch.empty(B, K, d, dtype=acc, device=dev)
    mask_u8 = _mask_u8(mask)
    has_init = init_logits is not None
    init = init_logits.detach().to(acc).contiguous() if has_init else c_last
    blog = torch.empty(B, 2, K, L, dtype=acc, device=dev)  # logits scratch (ping-pong)
    BK, BL, BD, one, nw = _blocks(K, L, d, per_pos, block_l)
    _routing_fwd_kernel[(B,)](
        u, mask_u8, init, v, c_last, s_last, blog, K, L, d, sUb, sUk, sUl,
        ITERS=int(iters), HAS_INIT=has_init, SEQ_AXIS=_seq_mode(seq_axis, seq_all), PER_POS=per_pos,
        ONE_CHUNK=one, ACC=tl_acc_dtype(u.dtype), BLOCK_K=BK, BLOCK_L=BL, BLOCK_D=BD,
        num_warps=nw)
    return v, c_last, s_last


def _routing_bwd(grad_v: torch.Tensor, u: Optional[torch.Tensor], mask: torch.Tensor,
                 init_logits: Optional[torch.Tensor], c_last: torch.Tensor,
                 s_last: torch.Tensor, num_interests: int, iters: int, seq_axis: bool,
                 detach: bool, per_position: bool, seq_all: bool = False, *,
                 block_l: Optional[int] = None) -> torch.Tensor:
    """Capsule routing backward.

    grad_v: (B, K, d); u: as in ``_routing_fwd`` (None allowed when detach); c_last, s_last:
    from the forward. Returns grad_u in u's layout ((B, L, d), summed over k, or (L, B, K, d))
    and grad_v's dtype. detach=True: gradient through the last iteration's s only (c_last a
    constant), u unused. detach=False: gradient through every iteration; the forward is
    recomputed from u with 2*B*T*K*(L + d) (+ 2*B*T*K on the sequence axis) fp32 scratch.
    """
    grad_v = grad_v.contiguous()
    B, K, d = grad_v.shape
    L = mask.shape[1]
    if K != num_interests:
        raise ValueError(f"grad_v: K={K} != num_interests={num_interests}")
    per_pos = bool(per_position)
    if per_pos:
        u_shape = (L, B, K, d)
    else:
        u_shape = (B, L, d)
    _, _, _, _, sUb, sUk, sUl = _layout(u_shape, num_interests, per_pos)
    dev = grad_v.device
    if B == 0 or L == 0 or d == 0 or K == 0:
        return torch.zeros(u_shape, dtype=grad_v.dtype, device=dev)
    grad_u = torch.empty(u_shape, dtype=grad_v.dtype, device=dev)  # fully written by the kernel
    mask_u8 = _mask_u8(mask)
    BK, BL, BD, one, nw = _blocks(K, L, d, per_pos, block_l)
    T = int(iters)
    if detach:
        acc = acc_dtype(c_last.dtype)
        c = c_last.contiguous()
        s = s_last.contiguous()
        dummy = c
        _routing_bwd_kernel[(B,)](
            grad_v, dummy, mask_u8, dummy, c, s, grad_u,
            dummy, dummy, dummy, dummy, dummy, dummy,
            K, L, d, sUb, sUk, sUl,
            ITERS=T, HAS_INIT=False, SEQ_AXIS=_seq_mode(seq_axis, seq_all), PER_POS=per_pos, DETACH=True,
            ONE_CHUNK=one, ACC=tl_acc_dtype(acc), BLOCK_K=BK, BLOCK_L=BL, BLOCK_D=BD, num_warps=nw)
        return grad_u
    if u is None:
        raise ValueError("u is required when detach=False")
    u = u.contiguous()
    if tuple(u.shape) != u_shape:
        raise ValueError(f"u: expected shape {u_shape}, got {tuple(u.shape)}")
    acc = acc_dtype(u.dtype)
    has_init = init_logits is not None
    f = dict(dtype=acc, device=dev)
    blog = torch.empty(B, T, K, L, **f)
    gb = torch.empty(B, T, K, L, **f)
    gb[:, T - 1].zero_()  # no gradient w.r.t. a logits update after the last iteration
    sall = torch.empty(B, T, K, d, **f)
    gs = torch.empty(B, T, K, d, **f)
    if seq_axis:
        mall = torch.empty(B, T, K, **f)
        dall = torch.empty(B, T, K, **f)
    else:
        mall = dall = blog  # unused
    init = init_logits.detach().to(acc).contiguous() if has_init else blog
    _routing_bwd_kernel[(B,)](
        grad_v, u, mask_u8, init, blog, blog, grad_u,
        blog, sall, mall, dall, gs, gb,
        K, L, d, sUb, sUk, sUl,
        ITERS=T, HAS_INIT=has_init, SEQ_AXIS=_seq_mode(seq_axis, seq_all), PER_POS=per_pos, DETACH=False,
        ONE_CHUNK=one, ACC=tl_acc_dtype(u.dtype), BLOCK_K=BK, BLOCK_L=BL, BLOCK_D=BD, num_warps=nw)
    return grad_u


# ----------------------------------------------------------------------------- fused MIND launchers
def mind_fusable(L: int, d: int, dtype: torch.dtype) -> bool:
    """True when the fused MIND kernels take (seq_len L, dim d, dtype): fp32/bf16/fp16 and a
    row's u tile (pow2(L) x pow2(d), each at least 16 for tl.dot) small enough to stay in
    registers (_RESIDENT_MAX elements)."""
    return (dtype in (torch.float32, torch.bfloat16, torch.float16)
            and pow2(L, 16) * pow2(d, 16) <= _RESIDENT_MAX)


def _mind_blocks(K: int, L: int, d: int):
    BK, BL, BD = pow2(K), pow2(L, 16), pow2(d, 16)
    num_warps = max(4, min(8, (BL * BD) // (32 * _ELEMS_PER_THREAD)))
    return BK, BL, BD, num_warps


def _routing_mind_fwd(seq_emb: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                      init_logits: Optional[torch.Tensor], num_interests: int, iters: int,
                      seq_axis: bool, seq_all: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused MIND forward: u = seq_emb · weightᵀ inside the routing kernel.

    seq_emb: (B, L, d); weight: (d, d); mask: (B, L) bool; init_logits: (B, K, L) or None.
    Returns v (B, K, d) in seq_emb's dtype, c_last (B, K, L) and s_last (B, K, d) fp32, as
    ``_routing_fwd``. Padded positions of seq_emb are ignored unless seq_all.
    """
    B, L, d = seq_emb.shape
    K = num_interests
    if not mind_fusable(L, d, seq_emb.dtype):
        raise ValueError(f"fused MIND routing: L={L}, d={d}, {seq_emb.dtype} not supported "
                         "(see mind_fusable)")
    e = seq_emb.contiguous()
    w = weight.contiguous()
    dev = e.device
    v = torch.empty(B, K, d, dtype=e.dtype, device=dev)
    c_last = torch.empty(B, K, L, dtype=torch.float32, device=dev)
    s_last = torch.empty(B, K, d, dtype=torch.float32, device=dev)
    mask_u8 = _mask_u8(mask)
    has_init = init_logits is not None
    init = init_logits.detach().float().contiguous() if has_init else c_last
    blog = torch.empty(B, 2, K, L, dtype=torch.float32, device=dev)
    BK, BL, BD, nw = _mind_blocks(K, L, d)
    cast, prec = dot_flags(e)
    _routing_mind_fwd_kernel[(B,)](
        e, w, mask_u8, init, v, c_last, s_last, blog, K, L, d,
        ITERS=int(iters), HAS_INIT=has_init, SEQ_AXIS=_seq_mode(seq_axis, seq_all),
        CAST_F32=cast, PREC=prec, BLOCK_K=BK, BLOCK_L=BL, BLOCK_D=BD, num_warps=nw)
    return v, c_last, s_last


def _routing_mind_bwd(grad_v: torch.Tensor, seq_emb: torch.Tensor, weight: torch.Tensor,
                      mask: torch.Tensor, c_last: torch.Tensor, s_last: torch.Tensor,
                      num_interests: int, seq_all: bool = False, *, detach: bool = True,
                      init_logits: Optional[torch.Tensor] = None, iters: int = 3,
                      seq_axis: bool = False, programs: Optional[int] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused MIND backward.

    detach=True: iterations before the last detached (c_last, s_last used). detach=False:
    through every iteration (init_logits, iters, seq_axis as the forward's; c_last / s_last
    unused), with 2*P*T*K*(L + d) + 2*P*T*K fp32 scratch (per program, not per row).
    Returns (grad seq_emb (B, L, d) in seq_emb's dtype, grad weight (d, d) in weight's dtype).
    dW is reduced in two stages: per-program fp32 partials (P, d, d), summed here.
    programs: P (default 2 per SM; the interpreter reports 4 SMs).
    """
    B, L, d = seq_emb.shape
    K = num_interests
    e = seq_emb.contiguous()
    w = weight.contiguous()
    dev = e.device
    if programs is None:
        programs = 2 * num_sms(dev)
    P = max(1, min(B, int(programs)))
    de = torch.empty_like(e)
    dwp = torch.empty(P, d, d, dtype=torch.float32, device=dev)
    mask_u8 = _mask_u8(mask)
    BK, BL, BD, nw = _mind_blocks(K, L, d)
    cast, prec = dot_flags(e)
    T = int(iters)
    f = dict(dtype=torch.float32, device=dev)
    has_init = False
    if detach:
        init = blog = sall = mall = dall = gs = gb = dwp  # unused
    else:
        blog = torch.empty(P, T, K, L, **f)
        gb = torch.empty(P, T, K, L, **f)
        gb[:, T - 1].zero_()  # no gradient w.r.t. a logits update after the last iteration
        sall = torch.empty(P, T, K, d, **f)
        gs = torch.empty(P, T, K, d, **f)
        mall = torch.empty(P, T, K, **f)
        dall = torch.empty(P, T, K, **f)
        has_init = init_logits is not None
        init = init_logits.detach().float().contiguous() if has_init else blog
    _routing_mind_bwd_kernel[(P,)](
        grad_v.contiguous(), e, w, mask_u8, c_last.contiguous(), s_last.contiguous(), de, dwp,
        init, blog, sall, mall, dall, gs, gb,
        B, K, L, d, ITERS=T, HAS_INIT=has_init, DETACH=bool(detach),
        SEQ_AXIS=_seq_mode(seq_axis, seq_all), CAST_F32=cast, PREC=prec,
        BLOCK_K=BK, BLOCK_L=BL, BLOCK_D=BD, num_warps=nw,
        # no software pipelining of the row loop: its stage buffers and the registers that
        # feed them are what pushed fp32 (tf32x3) into spills on sm_90
        **({"num_stages": 1} if gpu_tuned(dev) else {}))
    return de, dwp.sum(0).to(weight.dtype)
