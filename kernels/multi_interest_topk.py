"""Triton kernel of multi-interest top-n retrieval (``multi_interest_topk``).

One program per block of BLOCK_U users walks the whole catalog in tiles of BLOCK_T items
(BLOCK_T = the power of two >= n, at least 16). For each tile it computes the users' scores
interest by interest with ``tl.dot`` (fp32 accumulation), keeps the max over the unmasked
interests, sets excluded ids to -inf, and packs every (score, id) into one int64 key:

    key = (monotone int32 image of the fp32 score) << 32 | (2^31 - 1 - id)

so that ordering keys is ordering by score, ties by the smaller id. Each user's running top
BLOCK_T keys sit in registers, sorted descending; a tile is merged only when some user has a
candidate above its n-th best key: the running keys and the tile's keys are joined, sorted
(``tl.sort``) and the upper half kept. Nothing of size (U, N) ever exists. NaN scores become
-inf; -inf keys decode to id -1 / score -inf (the padding of users with fewer than n items).

Under TRITON_INTERPRET=1 bf16 ``tl.dot`` is broken, so bf16 operands are cast to fp32 there
(DOT_DTYPE). fp32 dots follow ``torch.get_float32_matmul_precision()``: tf32 when the user
allowed it, else 3xTF32 on GPUs (fp32-level error; plain "ieee" lowers to FMA on sm_90).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _utils

_NEG_KEY = tl.constexpr(-9187343244130779136)  # key of (score -inf, low bits 0): below all keys


@triton.jit
def _multi_interest_topk_fwd_kernel(
    Q, ITEMS, MASK, EX,             # (U, K, D), (N, D), (U, K) uint8, (U, E) int64
    OUT_S, OUT_I,                   # (U, n) fp32, (U, n) int64
    U, K, N, D, E, n_out,
    HAS_MASK: tl.constexpr, HAS_EX: tl.constexpr,
    BLOCK_U: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_u = pid * BLOCK_U + tl.arange(0, BLOCK_U).to(tl.int64)
    u_ok = offs_u < U
    offs_t = tl.arange(0, BLOCK_T)
    offs_dd = tl.arange(0, BLOCK_D)
    buf = tl.full((BLOCK_U, BLOCK_T), _NEG_KEY, tl.int64)   # sorted descending
    thr = tl.full((BLOCK_U,), _NEG_KEY, tl.int64)           # n-th best key so far
    for j0 in range(0, N, BLOCK_T):
        offs_n = j0 + offs_t.to(tl.int64)
        n_ok = offs_n < N
        best = tl.full((BLOCK_U, BLOCK_T), float("-inf"), tl.float32)
        for k in range(K):
            s = tl.zeros((BLOCK_U, BLOCK_T), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                d_ok = offs_d < D
                q = tl.load(Q + (offs_u[:, None] * K + k) * D + offs_d[None, :],
                            mask=u_ok[:, None] & d_ok[None, :], other=0.0)
                it = tl.load(ITEMS + offs_n[None, :] * D + offs_d[:, None],
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)   # (BLOCK_D, T)
                s += tl.dot(q.to(DOT_DTYPE), it.to(DOT_DTYPE), input_precision=INPUT_PRECISION,
                            out_dtype=tl.float32)
            if HAS_MASK:
                use = tl.load(MASK + offs_u * K + k, mask=u_ok, other=0) != 0
                s = tl.where(use[:, None], s, float("-inf"))
            best = tl.where((s > best) | (s != s), s, best)   # max that propagates NaN
        best = tl.where((best != best) | (~n_ok[None, :]), float("-inf"), best)
        if HAS_EX:
            for e in range(E):
                ex = tl.load(EX + offs_u * E + e, mask=u_ok, other=-1)
                best = tl.where(offs_n[None, :] == ex[:, None], float("-inf"), best)
        bits = best.to(tl.int32, bitcast=True)
        mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = (mono.to(tl.int64) << 32) | (0x7FFFFFFF - offs_n)[None, :]
        if tl.max(tl.where(key > thr[:, None], 1, 0)) > 0:
            both = tl.reshape(tl.join(buf, key), (BLOCK_U, 2 * BLOCK_T))
            both = tl.sort(both, dim=1, descending=True)
            buf, _ = tl.split(tl.permute(tl.reshape(both, (BLOCK_U, 2, BLOCK_T)), (0, 2, 1)))
            thr = tl.sum(tl.where(offs_t[None, :] == n_out - 1, buf, 0), axis=1)
    m = (buf >> 32).to(tl.int32)
    bits = tl.where(m >= 0, m, m ^ 0x7FFFFFFF)
    score = bits.to(tl.float32, bitcast=True)
    ids = 0x7FFFFFFF - (buf & 0xFFFFFFFF)
    ids = tl.where(score == float("-inf"), -1, ids)
    out_ok = u_ok[:, None] & (offs_t[None, :] < n_out)
    tl.store(OUT_S + offs_u[:, None] * n_out + offs_t[None, :], score, mask=out_ok)
    tl.store(OUT_I + offs_u[:, None] * n_out + offs_t[None, :], ids, mask=out_ok)


def _multi_interest_topk_fwd(interests: torch.Tensor, items: torch.Tensor, n: int,
                             interest_mask: Optional[torch.Tensor],
                             exclude: Optional[torch.Tensor]):
    """interests (U, K, d), items (N, d) of one dtype (fp32/bf16/fp16); interest_mask (U, K)
    bool or None; exclude (U, E) int64 (-1 = padding) or None.
    -> (scores (U, n) fp32, ids (U, n) int64), id -1 / score -inf where fewer than n items."""
    U, K, D = interests.shape
    N = items.shape[0]
    dev = interests.device
    if U == 0 or N == 0:
        return (torch.full((U, n), float("-inf"), dtype=torch.float32, device=dev),
                torch.full((U, n), -1, dtype=torch.int64, device=dev))
    # the kernel writes every (u, j < n) entry (-inf / -1 past the N-th item): no fill
    scores = torch.empty((U, n), dtype=torch.float32, device=dev)
    ids = torch.empty((U, n), dtype=torch.int64, device=dev)
    q = interests.contiguous()
    it = items.contiguous()
    interp = _utils.interpreting()
    if q.dtype == torch.bfloat16 and interp:
        dot = tl.float32   # bf16 tl.dot is broken under the interpreter
    else:
        dot = {torch.float32: tl.float32, torch.float16: tl.float16,
               torch.bfloat16: tl.bfloat16}[q.dtype]
    block_t = _utils.pow2(n, lo=16)
    block_u = 64 if block_t <= 64 else 32 if block_t <= 128 else 16
    if interp:
        block_u = 16
    block_d = _utils.pow2(D, lo=16, hi=128)
    m8 = interest_mask.contiguous().view(torch.uint8) if interest_mask is not None else q
    ex = exclude.contiguous() if exclude is not None else ids
    E = exclude.shape[1] if exclude is not None else 0
    # sm_90 compile check (bench/sm90_report.py): fp32 (3xTF32) spills with 3 stages, not 2
    kwargs = {} if interp else {"num_warps": 8 if block_u * block_t >= 4096 else 4,
                                "num_stages": 2 if dot == tl.float32 else 3}
    # fp32 dots: 3xTF32 (or tf32), never "ieee", which spills on sm_90 (fp32_dot_precision);
    # "ieee" is ignored by bf16/fp16 dots
    prec = _utils.fp32_dot_precision() if dot == tl.float32 else "ieee"
    _multi_interest_topk_fwd_kernel[(triton.cdiv(U, block_u),)](
        q, it, m8, ex, scores, ids, U, K, N, D, E, n,
        HAS_MASK=interest_mask is not None, HAS_EX=exclude is not None,
        BLOCK_U=block_u, BLOCK_T=block_t, BLOCK_D=block_d,
        DOT_DTYPE=dot, INPUT_PRECISION=prec, **kwargs)
    return scores, ids
