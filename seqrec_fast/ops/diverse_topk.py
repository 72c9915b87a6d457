"""ComiRec's controllable aggregation (``diverse_topk``): n greedy picks from a user's merged
candidates, each maximising score - lam * (number of already picked items of its category).
Registered as the ``seqrec_fast::diverse_topk`` custom op, run by Triton (GPU, or CPU tensors
under TRITON_INTERPRET=1), C++ (CPU, parallel over users) or the eager reference (ComiRec's
loop, one user at a time). Inference only: no gradient.

``interest_candidates`` builds ComiRec's exact candidate list (the union of the per-interest
top-n lists) when the plain top-n by max of ``multi_interest_topk`` is not the wanted pool.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, _ext
from .. import backend as _backend
from ..reference.diverse_topk import diverse_topk_ref
from ._common import on_input_device
from .multi_interest_topk import multi_interest_topk

OP = "diverse_topk"
_SCORE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _prepare(scores: Tensor, ids: Tensor, categories: Tensor, n: int, lam: float):
    """Batched preparation shared by the fused backends: float64 scores with -inf at invalid
    places, sorted descending per row (stable: ties keep the row order), the candidates'
    categories, and the penalty table pen[c] = lam·c (c = 0..n)."""
    cats = categories.to(torch.int64)
    cat = torch.where(ids >= 0, cats[ids.clamp(min=0)], torch.full_like(ids, -1))
    s = scores.to(torch.float64)
    valid = (ids >= 0) & (cat >= 0) & (s > float("-inf"))      # NaN > -inf is False
    s = torch.where(valid, s, torch.full_like(s, float("-inf")))
    pen = lam * torch.arange(n + 1, dtype=torch.float64, device=scores.device)
    # rows whose valid scores already descend (multi_interest_topk's output) need no sort: the
    # kernels skip the -inf places, and a stable sort would keep the valid ones where they are
    prev = torch.cummin(torch.where(valid, s, torch.full_like(s, float("inf"))), dim=1).values
    if s.shape[1] < 2 or bool((s[:, 1:] <= prev[:, :-1]).all()):
        return s, ids, cat, pen
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return s.gather(1, order), ids.gather(1, order), cat.gather(1, order), pen


@torch.library.custom_op("seqrec_fast::diverse_topk", mutates_args=())
@on_input_device
def _diverse_topk_op(scores: Tensor, ids: Tensor, categories: Tensor, n: int, lam: float,
                     backend: str) -> Tuple[Tensor, Tensor]:
    """-> picked scores (U, n) in scores' dtype, ids (U, n) int64 (validated inputs)."""
    if backend == "eager":
        s, i = diverse_topk_ref(scores, ids, categories, n, lam)
        return s, i
    s, i, c, pen = _prepare(scores, ids, categories, n, lam)
    if backend == "cpp":
        out_s, out_i = _ext._C.diverse_topk_fwd_cpu(s, i, c, n, pen)
    elif backend == "triton":
        from seqrec_fast.kernels import diverse_topk as k

        out_s, out_i = k._diverse_topk_fwd(s, i, c, n, pen)
    else:
        raise ValueError(f"no diverse_topk kernel for backend {backend!r}")
    return out_s.to(scores.dtype), out_i


@_diverse_topk_op.register_fake
def _(scores, ids, categories, n, lam, backend):
    U = scores.shape[0]
    return scores.new_empty((U, n)), scores.new_empty((U, n), dtype=torch.int64)


def _validate(scores, ids, categories, n, lam):
    _checks.tensor("scores", scores, ndim=2, dtypes=_SCORE_DTYPES)
    device = scores.device
    _checks.tensor("ids", ids, ndim=2, dtypes=(torch.int64,), device=device)
    if ids.shape != scores.shape:
        raise ValueError(f"ids must have the shape of scores {tuple(scores.shape)}, got "
                         f"{tuple(ids.shape)}")
    _checks.tensor("categories", categories, ndim=1, dtypes=_INT_DTYPES, device=device)
    _checks.positive_int("n", n)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float, got {type(lam).__name__}")
    lam = float(lam)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be finite and >= 0, got {lam}")
    if ids.numel() and not _checks.compiling():   # host sync; skipped under compile
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()   # one host read
        if lo < -1 or hi >= categories.shape[0]:
            raise ValueError(f"ids must lie in [0, {categories.shape[0]}) (the length of "
                             f"categories) or be -1 (no candidate), got range [{lo}, {hi}]")
    return lam


def diverse_topk(scores: Tensor, ids: Tensor, categories: Tensor, n: int, lam: float, *,
                 backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """ComiRec's controllable aggregation: n greedy, category-penalised picks per user.

    Args:
      scores: (users, M) candidate scores (fp32/fp64/bf16/fp16), e.g. the scores of
        ``multi_interest_topk(..., M)`` or of :func:`interest_candidates`.
      ids: (users, M) int64 candidate ids, -1 = no candidate. A row's ids should be distinct
        (both candidate builders guarantee it); a repeated id is simply another candidate.
      categories: (num_items,) integer category of every item id; < 0 = no category, such
        candidates are dropped (ComiRec drops items missing from its category map).
      n: number of picks, >= 1.
      lam: penalty per already picked item of the same category, finite and >= 0 (ComiRec's
        ``coef``). lam = 0 returns the candidates in score order (the plain merge).
      backend: "auto" | "triton" | "cpp" | "eager" (env SEQREC_FAST_BACKEND overrides "auto").

    Returns (scores (users, n) in scores' dtype, the candidates' own scores, and ids (users, n)
    int64) in pick order; id -1 / score -inf once a user's valid candidates run out.

    What is matched (ComiRec, ``evaluate_full`` with ``coef`` in src/train.py of the official
    code): the candidate list is sorted by score descending with a stable sort (equal scores
    keep their order in the row), candidates without a category are dropped; then n rounds,
    each taking the FIRST candidate in list order whose score - lam·count[category] is
    strictly the largest (later equal values never replace it), removing it and counting its
    category. Scores are compared in float64 (ComiRec's float32 faiss scores minus a Python
    float product are float64 under NumPy 1.x) and lam·count is rounded once, as in Python.
    ComiRec's early exit of the scan (a candidate whose raw score is below the best adjusted
    value ends it) changes nothing for a sorted list and lam >= 0, the only lam accepted here.
    Differences: ComiRec raises when fewer than n candidates remain (we pad with -1 / -inf),
    and its ``--coef`` option has no ``type=float`` (it would arrive as a string): we take lam
    as the number it was meant to be. Invalid places (id -1, NaN or -inf score) are dropped.
    """
    lam = _validate(scores, ids, categories, n, lam)
    be = _backend.resolve(OP, backend, scores.device)
    with torch.no_grad():
        return _diverse_topk_op(scores.detach(), ids, categories, n, lam, be)


def interest_candidates(interests: Tensor, items: Tensor, n: int, *,
                        interest_mask: Optional[Tensor] = None,
                        exclude: Optional[Tensor] = None,
                        backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """ComiRec's candidate pool for the controllable aggregation: every interest's top-n list
    (exact, ties to the smaller id), the K lists concatenated in interest order, sorted by score
    with a stable sort and de-duplicated (first occurrence kept: an item keeps its best listed
    score). Arguments as :func:`multi_interest_topk`.

    Returns (scores (users, K·n) fp32, ids (users, K·n) int64), distinct ids first, then id -1 /
    score -inf. Its first n entries are ``multi_interest_topk``'s result (up to the order of
    tied scores); the rest is the part of the union beyond it, which is what a lam > 0
    aggregation can reach.
    """
    _checks.tensor("interests", interests, ndim=3)
    U, K, d = interests.shape
    mask = None if interest_mask is None else interest_mask.reshape(U * K, 1)
    ex = exclude
    if exclude is not None and isinstance(exclude, Tensor) and exclude.dim() == 2 \
            and exclude.shape[0] == U:
        ex = exclude.repeat_interleave(K, dim=0)
    s, i = multi_interest_topk(interests.reshape(U * K, 1, d), items, n, interest_mask=mask,
                               exclude=ex, backend=backend)
    s, i = s.reshape(U, K * n), i.reshape(U, K * n)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    s, i = s.gather(1, order), i.gather(1, order)
    # first occurrence of each id in this order: stable sort by id keeps the score order
    srt, perm = torch.sort(i, dim=1, stable=True)
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup_sorted).scatter_(1, perm, dup_sorted) | (i < 0)
    # compact the kept ones to the front, keeping their order
    keep_order = torch.sort(dup.to(torch.int8), dim=1, stable=True).indices
    s = s.masked_fill(dup, float("-inf")).gather(1, keep_order)
    i = i.masked_fill(dup, -1).gather(1, keep_order)
    return s, i
