"""Triton kernels of ComiRec-SA multi-interest self-attention (forward + backward).

    keys = x + pos                 x: (B, L, d), pos: (L, d) or none
    H    = tanh(keys·w1 + b1)      w1: (d, d_a), b1: (d_a,) or none
    A    = H·w2 + b2               w2: (d_a, K), b2: (K,) or none          -> (B, L, K)
    S    = softmax of A over the real positions of each row, 0 at padding  -> (B, K, L)
    out  = S·x                                                              -> (B, K, d)

H (B, L, d_a) never goes to global memory:

* ``_attention_fwd_kernel``, one program per batch row: L in chunks of BLOCK_L with an online
  (flash-style) softmax; for each chunk H is built BLOCK_DA columns at a time and folded into
  A at once. Writes out and the attention probabilities S (B, K, L) in fp32 — directly when L
  fits one chunk, else the raw logits plus the log-sum-exp, normalised by the launcher. S is
  the saved state of the backward (as small as A: K values per position).
* ``_attention_bwd_rows_kernel``, one program per batch row: gA = S·(x·goutᵀ + gSᵀ - delta)
  (written: (B, L, K) fp32), then H recomputed chunk by chunk for gZ = (gA·w2ᵀ)⊙(1-H²) and the
  final gx = S·gout + Σ_chunks gZ·w1ᵀ (no fp32 scratch, no atomics).
* ``_attention_bwd_weights_kernel``, grid (d_a chunks, L, batch slices): recomputes the H
  columns of its chunk for its (position, rows) and reduces gW2 = Hᵀ·gA, gb1 = Σ gZ,
  gW1 = keysᵀ·gZ in registers, atomically added once per program; gpos[l] = (Σ_b gZ)·w1ᵀ.

GEMM work in units of B·L·d·d_a: forward 1, backward 4 (rows: recomputation + gkeys;
weights: recomputation + gW1); HBM traffic ≈ 5 × |x|. Accumulation is fp32 (fp64 for fp64
inputs). Dot operands are in the input dtype (bf16/fp16
tensor cores on GPUs); fp32 dots follow ``torch.get_float32_matmul_precision()`` (tf32 only when
allowed). Under TRITON_INTERPRET=1, bf16 ``tl.dot`` is broken, so the launchers switch bf16 dot
operands to fp32 there (DOT_DTYPE). Weight gradients are accumulated with fp32 atomics, so
their summation order (not their accuracy) varies run to run on GPUs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, fp32_dot_precision, interpreting, num_sms, pow2, tl_acc_dtype

_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully padded chunks never give inf - inf


@triton.jit
def _tanh(z):
    # tanh through exp (no libdevice dependency, works in the interpreter); saturates to ±1
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _row_logits(keys, W1, B1, W2, B2, offs_d, d_ok, offs_k, k_ok, D, DA, K,
                HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_L: tl.constexpr,
                BLOCK_DA: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """A (BLOCK_L, BLOCK_K) = tanh(keys·w1 + b1)·w2 + b2, H built BLOCK_DA columns at a time."""
    a = tl.zeros((BLOCK_L, BLOCK_K), dtype=ACC)
    kd = keys.to(DOT_DTYPE)
    for a0 in range(0, DA, BLOCK_DA):
        offs_a = a0 + tl.arange(0, BLOCK_DA)
        a_ok = offs_a < DA
        w1 = tl.load(W1 + offs_d[:, None] * DA + offs_a[None, :],
                     mask=d_ok[:, None] & a_ok[None, :], other=0.0)
        z = tl.dot(kd, w1.to(DOT_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC)
        if HAS_B1:
            z += tl.load(B1 + offs_a, mask=a_ok, other=0.0).to(ACC)[None, :]
        # padded columns: 0 (their z is keys·0, which is NaN when a key is ±inf)
        h = tl.where(a_ok[None, :], _tanh(z), 0.0)
        w2 = tl.load(W2 + offs_a[:, None] * K + offs_k[None, :],
                     mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        a += tl.dot(h.to(DOT_DTYPE), w2.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                    out_dtype=ACC)
    if HAS_B2:
        a += tl.load(B2 + offs_k, mask=k_ok, other=0.0).to(ACC)[None, :]
    return a


@triton.jit
def _attention_fwd_kernel(
    X, MASK, W1, B1, W2, B2, POS,        # inputs (contiguous); MASK uint8 (B, L)
    OUT, PROBS, LSE,                     # (B, K, d) x.dtype, (B, K, L) ACC, (B, K) ACC
    L, D, DA, K,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_POS: tl.constexpr,
    ONE_CHUNK: tl.constexpr,             # L <= BLOCK_L: PROBS gets the final probabilities
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    m_i = tl.full((BLOCK_K,), _NEG_BIG, dtype=ACC)
    l_i = tl.zeros((BLOCK_K,), dtype=ACC)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        valid = tl.load(MASK + b * L + offs_l, mask=l_ok, other=0) != 0
        # padding is not data: padded positions are never read (0), so NaN/Inf there is inert
        xl = tl.load(X + (b * L + offs_l)[:, None] * D + offs_d[None, :],
                     mask=valid[:, None] & d_ok[None, :], other=0.0)
        keys = xl.to(ACC)
        if HAS_POS:
            keys += tl.load(POS + offs_l[:, None] * D + offs_d[None, :],
                            mask=l_ok[:, None] & d_ok[None, :], other=0.0).to(ACC)
        a = _row_logits(keys, W1, B1, W2, B2, offs_d, d_ok, offs_k, k_ok, D, DA, K,
                        HAS_B1, HAS_B2, BLOCK_L, BLOCK_DA, BLOCK_K, DOT_DTYPE,
                        INPUT_PRECISION, ACC)
        a = tl.where(valid[:, None], a, float("-inf"))
        # online softmax over the sequence axis, one running (max, sum) per interest
        m_new = tl.maximum(m_i, tl.max(a, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(a - m_new[None, :])  # padded positions: exp(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=0)
        probs_ptr = PROBS + (b * K + offs_k)[None, :] * L + offs_l[:, None]
        if ONE_CHUNK:  # (m, l) are final already: store the probabilities
            s = p / tl.where(l_i > 0, l_i, 1.0)[None, :]
            tl.store(probs_ptr, s, mask=l_ok[:, None] & k_ok[None, :])
        else:          # raw logits; the launcher normalises them with the lse
            tl.store(probs_ptr, a, mask=l_ok[:, None] & k_ok[None, :])
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p).to(DOT_DTYPE), xl.to(DOT_DTYPE),
                                            input_precision=INPUT_PRECISION, out_dtype=ACC)
        m_i = m_new
    has = l_i > 0  # False only for a fully padded row: zero interests, lse 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(OUT + (b * K + offs_k)[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])
    if not ONE_CHUNK:
        tl.store(LSE + b * K + offs_k, lse.to(LSE.dtype.element_ty), mask=k_ok)


@triton.jit
def _attention_bwd_rows_kernel(
    X, MASK, W1, B1, W2, POS, GOUT, PROBS, GPROBS, DELTA,
    GA, GX,                              # (B, L, K) ACC, (B, L, d) x.dtype
    L, D, DA, K,
    HAS_B1: tl.constexpr, HAS_POS: tl.constexpr, HAS_GPROBS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    kd_ok = k_ok[:, None] & d_ok[None, :]
    gout = tl.load(GOUT + (b * K + offs_k)[:, None] * D + offs_d[None, :], mask=kd_ok,
                   other=0.0)                                             # (BLOCK_K, BLOCK_D)
    delta = tl.load(DELTA + b * K + offs_k, mask=k_ok, other=0.0).to(ACC)
    god = gout.to(DOT_DTYPE)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        ld_ok = l_ok[:, None] & d_ok[None, :]
        valid = tl.load(MASK + b * L + offs_l, mask=l_ok, other=0) != 0
        xl = tl.load(X + (b * L + offs_l)[:, None] * D + offs_d[None, :],
                     mask=valid[:, None] & d_ok[None, :], other=0.0)  # padding read as 0
        keys = xl.to(ACC)
        if HAS_POS:
            keys += tl.load(POS + offs_l[:, None] * D + offs_d[None, :], mask=ld_ok,
                            other=0.0).to(ACC)
        lk_ok = l_ok[:, None] & k_ok[None, :]
        # the forward's probabilities (0 at padding), (BLOCK_L, BLOCK_K)
        s = tl.load(PROBS + (b * K + offs_k)[None, :] * L + offs_l[:, None], mask=lk_ok,
                    other=0.0).to(ACC)
        gs = tl.dot(xl.to(DOT_DTYPE), tl.trans(god), input_precision=INPUT_PRECISION,
                    out_dtype=ACC)                                        # (BLOCK_L, BLOCK_K)
        if HAS_GPROBS:
            gs += tl.load(GPROBS + (b * K + offs_k)[None, :] * L + offs_l[:, None], mask=lk_ok,
                          other=0.0).to(ACC)
        ga = s * (gs - delta[None, :])
        tl.store(GA + (b * L + offs_l)[:, None] * K + offs_k[None, :], ga.to(GA.dtype.element_ty),
                 mask=l_ok[:, None] & k_ok[None, :])
        gx = tl.dot(s.to(DOT_DTYPE), god, input_precision=INPUT_PRECISION, out_dtype=ACC)
        # gkeys = Σ_chunks gZ·w1ᵀ with gZ = (gA·w2ᵀ)⊙(1-H²): H recomputed chunk by chunk
        gad = ga.to(DOT_DTYPE)
        kd = keys.to(DOT_DTYPE)
        for a0 in range(0, DA, BLOCK_DA):
            offs_a = a0 + tl.arange(0, BLOCK_DA)
            a_ok = offs_a < DA
            w1 = tl.load(W1 + offs_d[:, None] * DA + offs_a[None, :],
                         mask=d_ok[:, None] & a_ok[None, :], other=0.0).to(DOT_DTYPE)
            z = tl.dot(kd, w1, input_precision=INPUT_PRECISION, out_dtype=ACC)
            if HAS_B1:
                z += tl.load(B1 + offs_a, mask=a_ok, other=0.0).to(ACC)[None, :]
            h = tl.where(a_ok[None, :], _tanh(z), 0.0)
            w2t = tl.load(W2 + offs_a[None, :] * K + offs_k[:, None],
                          mask=a_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_DA)
            gz = tl.dot(gad, w2t.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                        out_dtype=ACC) * (1.0 - h * h)
            gx += tl.dot(gz.to(DOT_DTYPE), tl.trans(w1), input_precision=INPUT_PRECISION,
                         out_dtype=ACC)
        tl.store(GX + (b * L + offs_l)[:, None] * D + offs_d[None, :],
                 gx.to(GX.dtype.element_ty), mask=ld_ok)


@triton.jit
def _attention_bwd_weights_kernel(
    X, MASK, POS, W1, B1, W2, GA,
    GW1, GB1, GW2, GPOS,                 # ACC, zeroed; atomically accumulated
    B, L, D, DA, K, ROWS_PER_PROG,
    HAS_B1: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DA: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    j = tl.program_id(0)
    l = tl.program_id(1).to(tl.int64)
    sl = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    offs_a = j * BLOCK_DA + tl.arange(0, BLOCK_DA)
    a_ok = offs_a < DA
    da_ok = d_ok[:, None] & a_ok[None, :]
    w1 = tl.load(W1 + offs_d[:, None] * DA + offs_a[None, :], mask=da_ok, other=0.0)
    w1d = w1.to(DOT_DTYPE)
    w2t = tl.load(W2 + offs_a[None, :] * K + offs_k[:, None], mask=a_ok[None, :] & k_ok[:, None],
                  other=0.0).to(DOT_DTYPE)                                # (BLOCK_K, BLOCK_DA)
    if HAS_B1:
        b1 = tl.load(B1 + offs_a, mask=a_ok, other=0.0).to(ACC)
    if HAS_POS:
        pos = tl.load(POS + l * D + offs_d, mask=d_ok, other=0.0).to(ACC)
    gw1 = tl.zeros((BLOCK_D, BLOCK_DA), dtype=ACC)
    gw2 = tl.zeros((BLOCK_DA, BLOCK_K), dtype=ACC)
    gb1 = tl.zeros((BLOCK_DA,), dtype=ACC)
    b_start = sl * ROWS_PER_PROG
    b_end = tl.minimum(b_start + ROWS_PER_PROG, B)
    for b0 in range(b_start, b_end, BLOCK_M):
        offs_b = b0 + tl.arange(0, BLOCK_M)
        b_ok = offs_b < b_end
        row = offs_b * L + l                                              # flat (b, l) index
        valid = tl.load(MASK + row, mask=b_ok, other=0) != 0
        keys = tl.load(X + row[:, None] * D + offs_d[None, :],
                       mask=valid[:, None] & d_ok[None, :], other=0.0).to(ACC)  # padding: 0
        if HAS_POS:
            keys = tl.where(b_ok[:, None], keys + pos[None, :], 0.0)
        ga = tl.load(GA + row[:, None] * K + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :],
                     other=0.0)                                           # (BLOCK_M, BLOCK_K)
        gad = ga.to(DOT_DTYPE)
        kd = keys.to(DOT_DTYPE)
        z = tl.dot(kd, w1d, input_precision=INPUT_PRECISION, out_dtype=ACC)
        if HAS_B1:
            z += b1[None, :]
        h = tl.where(a_ok[None, :], _tanh(z), 0.0)
        gw2 += tl.dot(tl.trans(h.to(DOT_DTYPE)), gad, input_precision=INPUT_PRECISION,
                      out_dtype=ACC)
        gz = tl.dot(gad, w2t, input_precision=INPUT_PRECISION, out_dtype=ACC) * (1.0 - h * h)
        gb1 += tl.sum(gz, axis=0)  # rows past b_end have gA = 0, hence gz = 0
        gw1 += tl.dot(tl.trans(kd), gz.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                      out_dtype=ACC)
    tl.atomic_add(GW1 + offs_d[:, None] * DA + offs_a[None, :], gw1, mask=da_ok)
    tl.atomic_add(GW2 + offs_a[:, None] * K + offs_k[None, :], gw2,
                  mask=a_ok[:, None] & k_ok[None, :])
    if HAS_B1:
        tl.atomic_add(GB1 + offs_a, gb1, mask=a_ok)
    if HAS_POS:
        # gpos[l] = Σ_b gZ[b, l]·w1ᵀ = (Σ_b gZ[b, l])·w1ᵀ: this chunk's share
        gpos = tl.sum(w1.to(ACC) * gb1[None, :], axis=1)                  # (BLOCK_D,)
        tl.atomic_add(GPOS + l * D + offs_d, gpos, mask=d_ok)


# ----------------------------------------------------------------------------------------------
# launchers

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}


def _numerics(dtype: torch.dtype):
    """(accumulation torch dtype, ACC, DOT_DTYPE, INPUT_PRECISION) for inputs of ``dtype``."""
    dot = _TL[dtype]
    if dtype == torch.bfloat16 and interpreting():
        dot = tl.float32  # the interpreter's bf16 tl.dot returns garbage (DESIGN.md)
    # fp32 dots follow torch's matmul precision; fp64 and half operands take "ieee" (ignored)
    prec = fp32_dot_precision() if dtype == torch.float32 else "ieee"
    return acc_dtype(dtype), tl_acc_dtype(dtype), dot, prec


def _pow2(n: int) -> int:
    """Block size for n elements: a power of two, at least 16 (tl.dot's minimum)."""
    return pow2(n, 16)


def _row_blocks(L: int, D: int, DA: int):
    block_d = _pow2(D)
    block_l = min(_pow2(L), 64 if block_d <= 64 else 32)
    block_da = min(_pow2(DA), 64 if block_d <= 128 else 32)
    return block_l, block_d, block_da


def _warps(tile_elems: int) -> int:
    return 8 if tile_elems >= 4096 else 4


# Launch configurations, sized with bench/sm90_report.py (sm_90, no spill, shared memory within
# 227 KB; bench/NOTES.md has the table). fp32 dots run as 3xTF32 (``fp32_dot_precision``): each
# is three tf32 MMAs on split big/small operands, which roughly triples the operand registers,
# so fp32 takes smaller tiles and one stage: (d_a chunks of 16, 32-row backward tiles). The
# 32-row tiles lower to mma.sync rather than wgmma (64 rows per warp group); at 64 rows the
# split operands spill. fp16/bf16 keep 64-row tiles (wgmma).


def _fp32_tc(dtype: torch.dtype) -> bool:
    """fp32 inputs: tensor-core dots with split operands (tf32x3/tf32), hence small tiles."""
    return dtype == torch.float32


def _fwd_config(dtype: torch.dtype, L: int, D: int, DA: int):
    """Forward kernel: (BLOCK_L, BLOCK_D, BLOCK_DA, num_warps, num_stages)."""
    block_l, block_d, block_da = _row_blocks(L, D, DA)
    if _fp32_tc(dtype):
        return block_l, block_d, min(block_da, 16), 4, 1
    return block_l, block_d, block_da, _warps(block_l * max(block_d, block_da)), 3


def _rows_config(dtype: torch.dtype, L: int, D: int, DA: int):
    """Rows-backward kernel: (BLOCK_L, BLOCK_D, BLOCK_DA, num_warps, num_stages)."""
    block_l, block_d, block_da = _row_blocks(L, D, DA)
    if _fp32_tc(dtype):
        block_l = min(block_l, 32 if block_d <= 64 else 16)
        return block_l, block_d, min(block_da, 16), 8 if block_d <= 64 else 4, 1
    return block_l, block_d, block_da, _warps(block_l * max(block_d, block_da)), 3


def _weights_config(dtype: torch.dtype, D: int, DA: int):
    """Weight-gradient kernel: (BLOCK_M, BLOCK_DA, num_warps, num_stages); d_a in chunks so
    that the (d, d_a-chunk) gradient tile stays in registers."""
    block_d = _pow2(D)
    if _fp32_tc(dtype):
        return 16, min(_pow2(DA), 32 if block_d <= 64 else 16), 4, 1
    block_da = min(_pow2(DA), max(16, 4096 // block_d))
    block_m = 64 if block_d <= 64 else 32
    return block_m, block_da, _warps(block_d * block_da), 3


def _contig(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _attention_fwd(x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor,
                   b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                   pos: Optional[torch.Tensor]):
    """Forward launch. x (B, L, d), mask (B, L) bool, w1 (d, d_a), b1 (d_a,)|None, w2 (d_a, K),
    b2 (K,)|None, pos (L, d)|None, all of x's dtype and device.

    Returns (interests (B, K, d) x.dtype, probs (B, K, L) fp32 (fp64 for fp64 inputs): the
    attention weights, 0 at padded positions and in fully padded rows).
    """
    B, L, D = x.shape
    DA, K = w2.shape
    acc_t, ACC, DOT, prec = _numerics(x.dtype)
    x, w1, w2, b1, b2, pos = (_contig(t) for t in (x, w1, w2, b1, b2, pos))
    m8 = mask.contiguous().view(torch.uint8)
    out = torch.empty((B, K, D), device=x.device, dtype=x.dtype)
    probs = torch.empty((B, K, L), device=x.device, dtype=acc_t)
    if B == 0:
        return out, probs
    block_l, block_d, block_da, warps, stages = _fwd_config(x.dtype, L, D, DA)
    one_chunk = L <= block_l
    lse = probs if one_chunk else torch.empty((B, K), device=x.device, dtype=acc_t)
    _attention_fwd_kernel[(B,)](
        x, m8, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2,
        pos if pos is not None else x, out, probs, lse,
        L, D, DA, K,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, HAS_POS=pos is not None,
        ONE_CHUNK=one_chunk,
        BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DA=block_da, BLOCK_K=_pow2(K),
        DOT_DTYPE=DOT, INPUT_PRECISION=prec, ACC=ACC,
        num_warps=warps, num_stages=stages,
    )
    if not one_chunk:  # logits -> probabilities (B·K·L elements, cheap next to the kernel)
        probs.sub_(lse[:, :, None]).exp_().masked_fill_(~mask[:, None, :], 0.0)
    return out, probs


def _attention_bwd(grad_out: torch.Tensor, grad_probs: Optional[torch.Tensor],
                   x: torch.Tensor, mask: torch.Tensor, w1: torch.Tensor,
                   b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                   pos: Optional[torch.Tensor], out: torch.Tensor, probs: torch.Tensor):
    """Backward launch: grads of (x, w1, b1, w2, b2, pos), None for absent optional inputs.

    grad_out (B, K, d); grad_probs (B, K, L) or None; out and probs as returned by the forward
    (the mask only keeps padded positions of x unread: probs are 0 there).
    """
    B, L, D = x.shape
    DA, K = w2.shape
    acc_t, ACC, DOT, prec = _numerics(x.dtype)
    dev = x.device
    x, w1, w2, b1, b2, pos = (_contig(t) for t in (x, w1, w2, b1, b2, pos))
    gout = grad_out.to(x.dtype).contiguous()
    probs = probs.contiguous()
    m8 = mask.contiguous().view(torch.uint8)
    has_gp = grad_probs is not None and grad_probs.numel() > 0
    # delta[b, k] = Σ_l S·gS = <gout, out> (+ <gprobs, probs>), as in flash attention
    delta = (gout.to(acc_t) * out.to(acc_t)).sum(-1)
    gp = None
    if has_gp:
        gp = grad_probs.to(acc_t).contiguous()
        delta = delta + (gp * probs).sum(-1)
    delta = delta.contiguous()

    block_l, block_d, block_da_rows, warps, stages = _rows_config(x.dtype, L, D, DA)
    block_k = _pow2(K)
    gx = torch.empty((B, L, D), device=dev, dtype=x.dtype)
    ga = torch.empty((B, L, K), device=dev, dtype=acc_t)
    gw1 = torch.zeros((D, DA), device=dev, dtype=acc_t)
    gw2 = torch.zeros((DA, K), device=dev, dtype=acc_t)
    gb1 = torch.zeros((DA,), device=dev, dtype=acc_t)
    gpos = torch.zeros((L, D), device=dev, dtype=acc_t) if pos is not None else gb1
    if B > 0:
        _attention_bwd_rows_kernel[(B,)](
            x, m8, w1, b1 if b1 is not None else w1, w2, pos if pos is not None else x, gout,
            probs, gp if has_gp else probs, delta,
            ga, gx, L, D, DA, K,
            HAS_B1=b1 is not None, HAS_POS=pos is not None, HAS_GPROBS=has_gp,
            BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DA=block_da_rows, BLOCK_K=block_k,
            DOT_DTYPE=DOT, INPUT_PRECISION=prec, ACC=ACC,
            num_warps=warps, num_stages=stages,
        )
        # weights kernel: grid (d_a chunks, positions, batch slices)
        block_m, block_da, warps, stages = _weights_config(x.dtype, D, DA)
        n_chunks = triton.cdiv(DA, block_da)
        if dev.type == "cuda":  # enough programs to fill the GPU, each over many rows
            target = 4 * num_sms(dev)
            slices = max(1, min(triton.cdiv(B, block_m), triton.cdiv(target, n_chunks * L)))
        else:
            slices = 1  # interpreter: fewer, longer programs
        rows = triton.cdiv(triton.cdiv(B, slices), block_m) * block_m
        slices = triton.cdiv(B, rows)
        _attention_bwd_weights_kernel[(n_chunks, L, slices)](
            x, m8, pos if pos is not None else x, w1, b1 if b1 is not None else w1, w2, ga,
            gw1, gb1, gw2, gpos,
            B, L, D, DA, K, rows,
            HAS_B1=b1 is not None, HAS_POS=pos is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DA=block_da, BLOCK_K=block_k,
            DOT_DTYPE=DOT, INPUT_PRECISION=prec, ACC=ACC,
            num_warps=warps, num_stages=stages,
        )
    dt = x.dtype
    g_b2 = ga.sum((0, 1)).to(dt) if b2 is not None else None
    return (gx, gw1.to(dt), gb1.to(dt) if b1 is not None else None, gw2.to(dt), g_b2,
            gpos.to(dt) if pos is not None else None)
