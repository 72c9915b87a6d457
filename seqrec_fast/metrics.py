"""Retrieval metrics as in ComiRec: Recall, NDCG and HitRate at N.

For one user with recommendation list r (N ids, best first) and target set T (duplicates removed):
  recall@N  = |r ∩ T| / |T|
  ndcg@N    = DCG / IDCG, DCG = Σ_{i: r_i ∈ T} 1/log2(i+2), IDCG = Σ_{i < min(|T|, N)} 1/log2(i+2)
  hitrate@N = 1 if r ∩ T ≠ ∅ else 0
  diversity@N = share of the pairs of distinct recommended items whose categories differ
Averaged over users. Ids < 1 in ``recs`` (padding 0, or -1 for "no result") never count.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch


def _targets_dense(tgt_indptr: torch.Tensor, tgt_items: torch.Tensor) -> torch.Tensor:
    """CSR targets -> (U, T_max) int64 padded with -2 (matches nothing)."""
    lens = tgt_indptr[1:] - tgt_indptr[:-1]
    U = lens.shape[0]
    T = int(lens.max()) if U else 0
    j = torch.arange(max(T, 1), device=tgt_items.device)[None, :]
    m = j < lens[:, None]
    pos = torch.where(m, tgt_indptr[:-1, None] + j, torch.zeros_like(j))
    out = torch.full(m.shape, -2, dtype=torch.int64, device=tgt_items.device)
    if tgt_items.numel():
        out = torch.where(m, tgt_items[pos.clamp(max=tgt_items.numel() - 1)], out)
    return out


def per_user_diversity(recs: torch.Tensor, categories: torch.Tensor,
                       k: Optional[int] = None) -> torch.Tensor:
    """Diversity@k as ComiRec computes it (``compute_diversity`` in its official code): over the
    m distinct recommended items of a user, the number of pairs i < j with different categories
    divided by m·(m-1)/2.

    recs: (U, N) int64 ids, best first; ids < 1 are ignored and a repeated id counts once (ComiRec
    takes the set of recommended items). categories: (num_items,) integer category of every id
    (compared as they are: two items of category -1 count as the same category). k: the first
    k columns (default all). Returns (U,) float64; a user with fewer than 2 items gets 0 (ComiRec
    would divide by zero). Batched: a sort per row, no (U, N, N) tensor.
    """
    if not isinstance(recs, torch.Tensor) or recs.dim() != 2 or recs.dtype.is_floating_point:
        raise ValueError(f"recs must be a (users, N) integer tensor, got "
                         f"{getattr(recs, 'shape', type(recs))}")
    if not isinstance(categories, torch.Tensor) or categories.dim() != 1 \
            or categories.dtype.is_floating_point or categories.dtype == torch.bool:
        raise ValueError("categories must be a 1-D integer tensor (num_items,)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    r = recs[:, :k] if k is not None else recs
    U = r.shape[0]
    if r.shape[1] == 0:
        return torch.zeros(U, dtype=torch.float64, device=r.device)
    cats_all = categories.to(device=r.device, dtype=torch.int64)
    if r.numel() and int(r.max()) >= cats_all.shape[0]:
        raise ValueError(f"recs holds id {int(r.max())} but categories has only "
                         f"{cats_all.shape[0]} entries")
    srt, _ = torch.where(r >= 1, r, torch.full_like(r, -1)).sort(dim=1)
    valid = srt >= 1
    valid[:, 1:] &= srt[:, 1:] != srt[:, :-1]                          # distinct ids only
    m = valid.sum(1).to(torch.float64)
    cat = cats_all[srt.clamp(min=0)]
    # invalid places get pairwise distinct categories above every category in the rows (no
    # host sync, no pass over the whole catalog's categories)
    pos = torch.arange(r.shape[1], device=r.device)
    top = cat.max() + 1 if cat.numel() else 0
    cat = torch.where(valid, cat, top + pos[None, :])
    cat, _ = cat.sort(dim=1)
    start = torch.ones_like(cat, dtype=torch.bool)
    start[:, 1:] = cat[:, 1:] != cat[:, :-1]
    run_start = torch.cummax(torch.where(start, pos[None, :], torch.zeros_like(cat)), dim=1).values
    same = (pos[None, :] - run_start).sum(1).to(torch.float64)        # Σ_runs len·(len-1)/2
    pairs = m * (m - 1) / 2
    return torch.where(pairs > 0, 1.0 - same / pairs.clamp(min=1), torch.zeros_like(pairs))


def per_user_metrics(recs: torch.Tensor, tgt_indptr: torch.Tensor, tgt_items: torch.Tensor,
                     ks: Sequence[int] = (20, 50), *,
                     categories: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """recs: (U, N) int64 ids, best first (ids < 1 ignored); tgt_indptr: (U+1,) int64;
    tgt_items: (nnz,) int64. Returns {"recall@k", "ndcg@k", "hitrate@k"}: (U,) float64 each,
    for every k in ks (k <= N), plus "diversity@k" (:func:`per_user_diversity`) when the items'
    ``categories`` (num_items,) are given."""
    if not isinstance(recs, torch.Tensor) or recs.dim() != 2:
        raise ValueError(f"recs must be a (users, N) tensor, got {getattr(recs, 'shape', type(recs))}")
    if not isinstance(tgt_indptr, torch.Tensor) or tgt_indptr.dim() != 1 \
            or tgt_indptr.shape[0] != recs.shape[0] + 1:
        raise ValueError(f"tgt_indptr must have shape ({recs.shape[0] + 1},), "
                         f"got {tuple(getattr(tgt_indptr, 'shape', ()))}")
    if not isinstance(tgt_items, torch.Tensor) or tgt_items.dim() != 1:
        raise ValueError("tgt_items must be a 1-D tensor")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > recs.shape[1]:
        raise ValueError(f"ks must lie in [1, N={recs.shape[1]}], got {ks}")
    tgt = _targets_dense(tgt_indptr.to(recs.device), tgt_items.to(recs.device))   # (U, T)
    # de-duplicate targets: keep the first occurrence of each id in a row
    srt, _ = tgt.sort(dim=1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[:, 1:] = (srt[:, 1:] == srt[:, :-1])
    n_t = ((srt >= 0) & ~dup).sum(1).to(torch.float64)                             # |T|
    hit = (recs[:, :, None] == srt[:, None, :]).any(-1) & (recs >= 1)              # (U, N)
    # a recommended id that appears twice in recs counts once
    rs, ri = recs.sort(dim=1, stable=True)
    rdup = torch.zeros_like(rs, dtype=torch.bool)
    rdup[:, 1:] = rs[:, 1:] == rs[:, :-1]
    first = torch.ones_like(hit)
    first.scatter_(1, ri, ~rdup)
    hit = hit & first
    disc = 1.0 / torch.log2(torch.arange(recs.shape[1], device=recs.device, dtype=torch.float64) + 2)
    out = {}
    safe = n_t.clamp(min=1)
    for k in ks:
        h = hit[:, :k].to(torch.float64)
        nh = h.sum(1)
        dcg = (h * disc[:k]).sum(1)
        cdisc = torch.cumsum(disc[:k], 0)
        ideal = cdisc[(torch.minimum(n_t, torch.tensor(float(k), dtype=torch.float64,
                                                        device=recs.device)) - 1).clamp(min=0).long()]
        valid = n_t > 0
        out[f"recall@{k}"] = torch.where(valid, nh / safe, torch.zeros_like(nh))
        out[f"ndcg@{k}"] = torch.where(valid, dcg / ideal, torch.zeros_like(dcg))
        out[f"hitrate@{k}"] = (nh > 0).to(torch.float64)
        if categories is not None:
            out[f"diversity@{k}"] = per_user_diversity(recs, categories, k)
    return out


def aggregate(parts: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Mean over users of per-user metric chunks -> {name: float}."""
    sums, n = {}, 0
    for p in parts:
        for k, v in p.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        n += int(next(iter(p.values())).shape[0]) if p else 0
    return {k: v / max(n, 1) for k, v in sums.items()}


def format_table(rows: Dict[str, Dict[str, float]], ks: Sequence[int] = (20, 50)) -> str:
    """{row name: metrics} -> a Markdown table (Recall, NDCG, HitRate at each k, and Diversity
    when some row has it)."""
    names = ["recall", "ndcg", "hitrate"]
    if any(f"diversity@{k}" in m for m in rows.values() for k in ks):
        names.append("diversity")
    cols = [f"{m}@{k}" for k in ks for m in names]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{m[c]:.4f}" if c in m else "-" for c in cols) + " |")
    return "\n".join(lines)
