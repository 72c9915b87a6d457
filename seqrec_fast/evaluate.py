"""Multi-interest retrieval evaluation (ComiRec protocol).

Users' interests retrieve their top-N items through ``seqrec_fast.retrieval`` (exact search or
a faiss index, per-interest lists merged by score); the recommendations are scored against the
held-out targets with ``seqrec_fast.metrics`` (Recall / NDCG / HitRate @N).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .data.batches import eval_batches
from .metrics import aggregate, per_user_metrics
from .ops.diverse_topk import diverse_topk
from .retrieval import Retriever, merge_topn


@torch.no_grad()
def evaluate(model, split, *, max_len: int, padding: str = "right", ks: Sequence[int] = (20, 50),
             batch_size: int = 512, retriever: str = "auto", device=None,
             max_users: Optional[int] = None, index: str = "flat", nlist: Optional[int] = None,
             nprobe: Optional[int] = None, hnsw_m: int = 32,
             ef_search: int = 128, process_group=None, categories=None,
             lam: Union[None, float, Sequence[float]] = None
             ) -> Union[Dict[str, float], List[Dict[str, float]]]:
    """Evaluate ``model`` (``user_embeddings(history, mask) -> (B, K, d)``,
    ``item_embeddings() -> (N, d)``) on an EvalSplit. Returns {"recall@k", "ndcg@k",
    "hitrate@k"} averaged over the split's users (the first ``max_users`` when given).
    ``retriever`` is the :class:`Retriever` method; ``index``, ``nlist``, ``nprobe``, ``hnsw_m``,
    ``ef_search`` go to :class:`Retriever` (approximate faiss indexes; "flat" = exact).

    categories: (n_items,) int category of every item id (< 0 = unknown), or None. Given, the
    result also has "diversity@k" (``metrics.per_user_diversity``, ComiRec's definition).
    lam: None for the plain top-k, or ComiRec's controllable aggregation with this λ >= 0 (needs
    ``categories``): for each k, the per-interest top-k lists are merged into candidates and k
    greedy picks maximise score − λ·(picked items of the same category)
    (:meth:`Retriever.recommend_diverse`; λ = 0 is the plain merge). As in ComiRec, each k is
    its own run (the @20 list is not a prefix of the @50 one). A list or tuple of λ gives a list
    of metrics dicts, one per λ, from one pass: the user embeddings and the candidates are
    computed once and only the greedy picks are repeated per λ.

    process_group: None, or a torch.distributed group (``"default"``) whose ranks each evaluate
    a contiguous share of the users (the model replicated on every rank); the per-user sums are
    all-reduced, so every rank returns the single-process result."""
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks must be a non-empty list of ints, got {ks!r}")
    if max_users is not None and (isinstance(max_users, bool) or not isinstance(max_users, int)
                                  or max_users < 1):
        raise ValueError(f"max_users must be a positive int or None, got {max_users!r}")
    n_users = split.n_users if max_users is None else min(split.n_users, max_users)
    lams = None
    if lam is not None:
        lams = list(lam) if isinstance(lam, (list, tuple)) else [lam]
        if not lams:
            raise ValueError("lam must be a number, a non-empty list of numbers or None, got []")
        for x in lams:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 \
                    or x == float("inf"):
                raise ValueError(f"lam must be a finite number >= 0 (or a list of them) or "
                                 f"None, got {x!r}")
        lams = [float(x) for x in lams]
        if categories is None:
            raise ValueError("lam (the controllable aggregation) needs the items' categories")
    if categories is not None:
        categories = _int64_cpu(categories)
        if categories.dim() != 1:
            raise ValueError(f"categories must be a (n_items,) tensor, got shape "
                             f"{tuple(categories.shape)}")
    group, rank, world = None, 0, 1
    sharded = getattr(model, "catalog_shard", None) is not None
    if sharded and process_group is None:
        process_group = model.catalog_shard[0]
    if process_group is not None:
        from .distributed import check_group

        group, rank, world = check_group(process_group)
    lo, hi = rank * n_users // world, (rank + 1) * n_users // world
    was_training = model.training
    model.eval()
    try:
        if device is None:
            device = next(model.parameters()).device
        topn = max(ks)
        parts = [[] for _ in (lams or [None])]          # per λ: the batches' per-user metrics
        if sharded:
            if lam is not None:
                raise ValueError("the controllable aggregation (lam) is not available for an item "
                                 "table sharded across ranks")
            if retriever == "faiss" or index != "flat":
                raise ValueError("a model whose item table is sharded across ranks is evaluated "
                                 "with the exact torch search (retriever='torch' or 'auto', "
                                 "index='flat')")
            parts = [_evaluate_sharded(model, split, max_len, padding, ks, batch_size, device,
                                       lo, hi, group, rank, world, categories)]
        else:
            ret = Retriever(model.item_embeddings(), retriever, index=index, nlist=nlist,
                            nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search)
            if categories is not None and categories.shape[0] != ret.items.shape[0]:
                raise ValueError(f"categories must have shape (n_items,) = "
                                 f"({ret.items.shape[0]},), got {tuple(categories.shape)}")
            cats = None if categories is None else categories.to(device)
            for hist, mask, ptr, tgt in eval_batches(split, max_len=max_len, padding=padding,
                                                     batch_size=batch_size, device=device,
                                                     start=lo, stop=hi):
                ue = model.user_embeddings(hist, mask)
                if lams is None:
                    recs, _ = ret.recommend(ue, topn)
                    parts[0].append(per_user_metrics(recs, ptr, tgt, ks, categories=cats))
                    continue
                batch = [{} for _ in lams]
                for k in ks:                    # one aggregation run per k, as ComiRec
                    ids, sc = ret.candidates(ue, k)
                    for j, x in enumerate(lams):
                        recs = diverse_topk(sc, ids, cats, k, x)[1]
                        batch[j].update(per_user_metrics(recs, ptr, tgt, (k,), categories=cats))
                for j, b in enumerate(batch):
                    parts[j].append(b)
    finally:
        model.train(was_training)
    out = [_reduce(p, ks, categories is not None, world, group, device) for p in parts]
    return out if isinstance(lam, (list, tuple)) else out[0]


def _int64_cpu(x) -> torch.Tensor:
    """An int sequence, array or tensor (any device) -> int64 CPU tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.int64)
    return torch.as_tensor(np.asarray(x), dtype=torch.int64)


def _reduce(parts, ks, with_diversity, world, group, device) -> Dict[str, float]:
    """The batches' per-user metrics -> their means over the users (of every rank)."""
    if world == 1:
        return aggregate(parts)
    import torch.distributed as dist

    metrics = ("recall", "ndcg", "hitrate") + (("diversity",) if with_diversity else ())
    names = [f"{m}@{k}" for k in ks for m in metrics]
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    for p in parts:
        sums[0] += p[names[0]].shape[0]
        for i, name in enumerate(names):
            sums[i + 1] += float(p[name].sum())
    if dist.get_backend(group) == "nccl":
        sums = sums.to(device)
    dist.all_reduce(sums, group=group)
    sums = sums.cpu()
    return {name: float(sums[i + 1]) / max(float(sums[0]), 1.0) for i, name in enumerate(names)}


def _evaluate_sharded(model, split, max_len, padding, ks, batch_size, device, lo, hi, group,
                      rank, world, categories=None):
    """Exact retrieval over an item table sharded across ranks (``model.shard_catalog``): every
    rank runs the same number of batches (the lookups are collective; a rank out of users sends
    one all-padded row), the ranks' queries are all-gathered, each rank scores them against its
    rows, and the per-shard top-N lists are all-gathered and merged for the rank's own users."""
    import torch.distributed as dist

    from .ops.catalog_parallel import all_gather_list
    from .ops.multi_interest_topk import multi_interest_topk

    topn = max(ks)
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    n_b = torch.tensor([(hi - lo + batch_size - 1) // batch_size], dtype=torch.int64, device=on)
    dist.all_reduce(n_b, op=dist.ReduceOp.MAX, group=group)
    batches = list(eval_batches(split, max_len=max_len, padding=padding, batch_size=batch_size,
                                device=device, start=lo, stop=hi))
    off, rows = model.item_shard()
    items = rows.detach().float()
    cats = None if categories is None else categories.to(items.device)   # recs' device
    parts = []
    for i in range(int(n_b.item())):
        if i < len(batches):
            hist, mask, ptr, tgt = batches[i]
        else:
            hist = torch.zeros((1, max_len), dtype=torch.int64, device=device)
            mask = torch.zeros((1, max_len), dtype=torch.bool, device=device)
            ptr = tgt = None
        ue = model.user_embeddings(hist, mask).float()              # (b, K, d)
        b, K, d = ue.shape
        q = ue.reshape(b * K, d)
        cnt = torch.tensor([q.shape[0]], dtype=torch.int64, device=on)
        cnts = [int(c.item()) for c in all_gather_list(cnt, group, world)]
        m = max(cnts)
        qp = q.new_zeros((m, d))
        qp[:q.shape[0]] = q
        qs = torch.cat(all_gather_list(qp, group, world))           # (W·m, d)
        # the exact top-N of each query over this shard, fused (no (W·m, n_r) score block);
        # row 0 of the first shard is the padding item; fewer rows than N: -1 / -inf padding
        shard, base = (items[1:], off + 1) if off == 0 else (items, off)
        sc, ix = multi_interest_topk(qs[:, None, :], shard, topn)
        ix = torch.where(ix >= 0, ix + base, ix)
        ids_all = all_gather_list(ix, group, world)
        sc_all = all_gather_list(sc, group, world)
        if ptr is None:
            continue
        mine = slice(rank * m, rank * m + q.shape[0])
        cand_i = torch.cat([t[mine] for t in ids_all], 1).reshape(b, -1)   # (b, K·W·topn)
        cand_s = torch.cat([t[mine] for t in sc_all], 1).reshape(b, -1)
        recs, _ = merge_topn(cand_i, cand_s, topn)
        parts.append(per_user_metrics(recs, ptr, tgt, ks, categories=cats))
    return parts


def evaluate_popularity(item_counts, split, ks: Sequence[int] = (20, 50),
                        categories=None) -> Dict[str, float]:
    """Most-popular baseline: everyone gets the items with the highest training counts.
    item_counts: (n_items,) with index 0 = padding; categories: as :func:`evaluate` (adds
    "diversity@k")."""
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64).clone()
    counts[0] = -1
    top = counts.topk(max(ks)).indices
    recs = top[None, :].expand(split.n_users, -1)
    cats = None if categories is None else _int64_cpu(categories)
    return aggregate([per_user_metrics(recs, torch.as_tensor(split.tgt_indptr),
                                       torch.as_tensor(split.tgt_items), ks, categories=cats)])
