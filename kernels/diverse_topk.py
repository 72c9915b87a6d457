"""Triton kernel of ComiRec's controllable aggregation (``diverse_topk``).

One program per user holds its M candidates in registers (BLOCK_M = next power of two):
scores in float64 sorted descending (-inf = invalid), categories, and per candidate the
number of picked items of its category. Each of the n rounds takes
``argmax(score - pen[count])`` over the live candidates (``tl.argmax`` keeps the first of
equal maxima, i.e. the earliest in list order), writes it, removes it and bumps the count of
every candidate of its category. ``pen[c] = lam·c`` is a float64 table computed once by the
caller, so lam·c is rounded the same way as in the C++ kernel and the Python reference and no
multiply-add can be fused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils


@triton.jit
def _diverse_topk_fwd_kernel(S, IDS, CATS, PEN, OUT_S, OUT_I, M, n_out,
                             BLOCK_M: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_M)
    ok = offs < M
    s = tl.load(S + u * M + offs, mask=ok, other=float("-inf"))
    ids = tl.load(IDS + u * M + offs, mask=ok, other=-1)
    cat = tl.load(CATS + u * M + offs, mask=ok, other=-1)
    live = s > float("-inf")
    cnt = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for j in range(n_out):
        pen = tl.load(PEN + cnt)
        adj = tl.where(live, s - pen, float("-inf"))
        pos = tl.argmax(adj, axis=0, tie_break_left=True)
        # nothing live: every adj is -inf, the argmax lands on a dead place and picks nothing
        hit = (offs == pos) & live
        pick_s = tl.max(tl.where(hit, s, float("-inf")), axis=0)
        pick_i = tl.sum(tl.where(hit, ids + 1, 0), axis=0) - 1
        pick_c = tl.sum(tl.where(hit, cat, 0), axis=0)
        tl.store(OUT_S + u * n_out + j, pick_s)
        tl.store(OUT_I + u * n_out + j, pick_i)
        live = live & (offs != pos)
        cnt += tl.where(live & (cat == pick_c), 1, 0)


def _diverse_topk_fwd(scores: torch.Tensor, ids: torch.Tensor, cats: torch.Tensor, n: int,
                      pen: torch.Tensor):
    """scores (U, M) float64 sorted descending per row (-inf = invalid), ids and cats (U, M)
    int64, pen (n + 1,) float64 = lam·[0..n]. -> (scores (U, n) float64, ids (U, n) int64)."""
    U, M = scores.shape
    if U == 0 or M == 0:
        return (torch.full((U, n), float("-inf"), dtype=torch.float64, device=scores.device),
                torch.full((U, n), -1, dtype=torch.int64, device=scores.device))
    # every program writes all n picks of its user (-inf / -1 once nothing is live): no fill
    out_s = torch.empty((U, n), dtype=torch.float64, device=scores.device)
    out_i = torch.empty((U, n), dtype=torch.int64, device=scores.device)
    block_m = _utils.pow2(M, lo=16)
    kwargs = {} if _utils.interpreting() else {"num_warps": 4 if block_m <= 1024 else 8}
    _diverse_topk_fwd_kernel[(U,)](scores.contiguous(), ids.contiguous(), cats.contiguous(),
                                   pen.contiguous(), out_s, out_i, M, n, BLOCK_M=block_m,
                                   **kwargs)
    return out_s, out_i
