"""Eager oracle of multi-interest top-n retrieval (``multi_interest_topk``).

Plain and exact: the scores of a chunk of users are computed in float64 (for every input
dtype), reduced by max over the user's unmasked interests, and ranked by (-score, id) with a
stable sort, so ties go to the smaller id.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_CHUNK_ELEMS = 1 << 24  # float64 scores held at once (users·interests·items)


def multi_interest_topk_ref(interests: torch.Tensor, items: torch.Tensor, n: int, *,
                            interest_mask: Optional[torch.Tensor] = None,
                            exclude: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """interests: (U, K, d); items: (N, d); interest_mask: (U, K) bool (True = use) or None;
    exclude: (U, E) int64 ids, -1 = padding, or None.

    score(u, i) = max over the unmasked k of <interests[u, k], items[i]>, computed in float64.
    Returns (scores (U, n), ids (U, n) int64): the n best items by (score desc, id asc);
    excluded items, items scoring -inf or NaN and users with every interest masked contribute
    nothing, and the places left over hold id -1 / score -inf. Scores come back in float64 for
    float64 inputs, else float32 (rounded from the float64 values).
    """
    U, K, _ = interests.shape
    N = items.shape[0]
    out_dtype = torch.float64 if interests.dtype == torch.float64 else torch.float32
    dev = interests.device
    scores = torch.full((U, n), float("-inf"), dtype=torch.float64, device=dev)
    ids = torch.full((U, n), -1, dtype=torch.int64, device=dev)
    it = items.to(torch.float64)
    step = max(1, _CHUNK_ELEMS // max(1, K * N))
    for u0 in range(0, U, step):
        q = interests[u0:u0 + step].to(torch.float64)                     # (u, K, d)
        s = torch.einsum("ukd,nd->ukn", q, it)                             # (u, K, N)
        if interest_mask is not None:
            s = s.masked_fill(~interest_mask[u0:u0 + step, :, None], float("-inf"))
        s = s.amax(dim=1) if K else s.new_full((s.shape[0], N), float("-inf"))
        s = torch.nan_to_num(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        if exclude is not None:
            ex = exclude[u0:u0 + step]
            ex = torch.where(ex < 0, torch.full_like(ex, N), ex)           # -1 -> spare column
            s = torch.cat([s, s.new_zeros(s.shape[0], 1)], 1).scatter(1, ex, float("-inf"))
            s = s[:, :N]
        # stable sort by id (already ascending), then by -score: ties keep the smaller id first
        order = torch.sort(-s, dim=1, stable=True).indices[:, :n]
        top = s.gather(1, order)
        m = min(n, N)
        valid = top > float("-inf")
        scores[u0:u0 + step, :m] = torch.where(valid, top, scores.new_tensor(float("-inf")))
        ids[u0:u0 + step, :m] = torch.where(valid, order, ids.new_tensor(-1))
    return scores.to(out_dtype), ids
