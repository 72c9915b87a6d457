"""Eager oracle of ComiRec's controllable aggregation (``diverse_topk``): the greedy loop of
ComiRec's official evaluation, one user at a time, in Python floats (float64)."""
from __future__ import annotations

from collections import defaultdict
from typing import Tuple

import torch


def diverse_topk_ref(scores: torch.Tensor, ids: torch.Tensor, categories: torch.Tensor, n: int,
                     lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """scores: (U, M) float; ids: (U, M) int64, -1 = no candidate; categories: (num_items,)
    int, < 0 = no category; n >= 1 picks; lam >= 0.

    Per user: the candidate list is the row without the places whose id is -1, whose category
    is < 0 (ComiRec drops items missing from its category map) or whose score is NaN or -inf,
    sorted by score descending with Python's stable sort (equal scores keep their order in the
    row). Then n rounds, each picking the first candidate in list order with the largest
    score - lam * (number of picked items of its category), and removing it.
    Returns (scores (U, n) in scores' dtype, ids (U, n) int64) of the picks in pick order;
    id -1 / score -inf once the list runs out.
    """
    U = scores.shape[0]
    out_s = torch.full((U, n), float("-inf"), dtype=scores.dtype)
    out_i = torch.full((U, n), -1, dtype=torch.int64)
    cats = categories.tolist()
    for u in range(U):
        item_list = []
        for i, s in zip(ids[u].tolist(), scores[u].double().tolist()):
            if i < 0 or cats[i] < 0 or s != s or s == float("-inf"):
                continue
            item_list.append((i, s, cats[i]))
        item_list.sort(key=lambda x: x[1], reverse=True)
        cate_dict = defaultdict(int)
        for j in range(min(n, len(item_list))):
            max_index = 0
            max_score = item_list[0][1] - lam * cate_dict[item_list[0][2]]
            for k in range(1, len(item_list)):
                adjusted = item_list[k][1] - lam * cate_dict[item_list[k][2]]
                if adjusted > max_score:
                    max_index = k
                    max_score = adjusted
                elif item_list[k][1] < max_score:
                    break   # list sorted by score: no later item can win (lam >= 0)
            i, s, c = item_list.pop(max_index)
            out_s[u, j] = s
            out_i[u, j] = i
            cate_dict[c] += 1
    return out_s.to(scores.device), out_i.to(scores.device)
