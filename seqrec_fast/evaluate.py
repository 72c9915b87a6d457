"""Multi-interest retrieval evaluation (ComiRec protocol).

Each of a user's K interests retrieves its top-N items (exact torch matmul + topk, or a faiss
``IndexFlatIP`` when ``faiss`` is importable and asked for); the K·N candidates are merged by
score, de-duplicated (an item keeps its best score) and the best N kept. Padding id 0 is never
retrieved. Metrics: see ``seqrec_fast.metrics``.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .data.sampler import eval_batches
from .metrics import aggregate, per_user_metrics

log = logging.getLogger("seqrec_fast.evaluate")

RETRIEVERS = ("auto", "torch", "faiss")
_said = set()


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.info(msg)


def merge_topn(ids: torch.Tensor, scores: torch.Tensor, topn: int):
    """Merge per-interest candidates. ids, scores: (B, M) (M = K·N, any order; ids < 1 are
    ignored). Returns (B, topn) ids (best first, -1 where fewer than topn distinct items) and
    their scores (-inf there). Each item appears once, with its highest score."""
    if ids.shape != scores.shape or ids.dim() != 2:
        raise ValueError(f"ids and scores must both be (batch, M), got {tuple(ids.shape)} and "
                         f"{tuple(scores.shape)}")
    scores = scores.float().masked_fill(ids < 1, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    ids_o, sc_o = ids.gather(1, order), scores.gather(1, order)
    srt, perm = ids_o.sort(dim=1, stable=True)     # equal ids keep the score order
    dup_sorted = torch.zeros_like(srt, dtype=torch.bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = torch.zeros_like(dup_sorted)
    dup.scatter_(1, perm, dup_sorted)
    sc_o = sc_o.masked_fill(dup, float("-inf"))
    k = min(topn, sc_o.shape[1])
    top, idx = sc_o.topk(k, dim=1)
    out = ids_o.gather(1, idx).masked_fill(torch.isinf(top) & (top < 0), -1)
    if k < topn:
        pad = topn - k
        out = torch.cat([out, out.new_full((out.shape[0], pad), -1)], 1)
        top = torch.cat([top, top.new_full((top.shape[0], pad), float("-inf"))], 1)
    return out, top


class Retriever:
    """Top-N inner-product search over an item table.

    item_emb: (n_items, d) with row 0 = padding (never returned). method: "torch" (exact,
    matmul + topk in chunks), "faiss" (IndexFlatIP; GPU index when faiss has GPU support and
    ``use_gpu``), "auto" (faiss when importable, else torch, saying so once in the log).
    """

    def __init__(self, item_emb: torch.Tensor, method: str = "auto", use_gpu: bool = True,
                 chunk_elems: int = 1 << 25):
        if not isinstance(item_emb, torch.Tensor) or item_emb.dim() != 2:
            raise ValueError(f"item_emb must be a (n_items, d) tensor, got "
                             f"{getattr(item_emb, 'shape', type(item_emb))}")
        if method not in RETRIEVERS:
            raise ValueError(f"method must be one of {RETRIEVERS}, got {method!r}")
        if method == "auto":
            if faiss_available():
                method = "faiss"
            else:
                method = "torch"
                _say_once("faiss is not installed: retrieval uses the exact torch matmul+topk "
                          "path (pip install 'seqrec_fast[faiss]' for faiss)")
        elif method == "faiss" and not faiss_available():
            raise RuntimeError("method='faiss' but faiss is not installed "
                               "(pip install 'seqrec_fast[faiss]')")
        self.method = method
        self.items = item_emb.detach().float()
        self.chunk_elems = chunk_elems
        self.index = None
        if method == "faiss":
            import faiss

            x = np.ascontiguousarray(self.items[1:].cpu().numpy(), dtype=np.float32)
            index = faiss.IndexFlatIP(x.shape[1])
            if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            index.add(x)
            self.index = index

    def search(self, queries: torch.Tensor, topn: int):
        """queries: (Q, d) -> ids (Q, topn) int64 (≥ 1, best first), scores (Q, topn) float32."""
        n_real = self.items.shape[0] - 1
        k = min(topn, n_real)
        if self.index is not None:
            q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
            s, i = self.index.search(q, k)
            ids = torch.from_numpy(i).long() + 1
            return ids.to(queries.device), torch.from_numpy(s).to(queries.device)
        items = self.items.to(queries.device)[1:]
        q = queries.detach().float()
        step = max(1, self.chunk_elems // max(n_real, 1))
        out_i, out_s = [], []
        for s in range(0, q.shape[0], step):
            sc = q[s:s + step] @ items.t()
            v, i = sc.topk(k, dim=1)
            out_i.append(i + 1)
            out_s.append(v)
        if not out_i:
            return (torch.empty(0, k, dtype=torch.int64, device=q.device),
                    torch.empty(0, k, device=q.device))
        return torch.cat(out_i), torch.cat(out_s)

    def recommend(self, user_emb: torch.Tensor, topn: int):
        """user_emb: (B, K, d) -> merged recommendations (B, topn) int64 (-1 = none), scores."""
        if not isinstance(user_emb, torch.Tensor) or user_emb.dim() != 3:
            raise ValueError(f"user_emb must be (batch, K, d), got "
                             f"{getattr(user_emb, 'shape', type(user_emb))}")
        B, K, d = user_emb.shape
        if d != self.items.shape[1]:
            raise ValueError(f"user_emb dim {d} != item_emb dim {self.items.shape[1]}")
        ids, sc = self.search(user_emb.reshape(B * K, d), topn)
        if K == 1:
            return merge_topn(ids, sc, topn) if ids.shape[1] < topn else (ids, sc)
        return merge_topn(ids.reshape(B, -1), sc.reshape(B, -1), topn)

    def save(self, path: str) -> None:
        """Write the faiss index (faiss only)."""
        if self.index is None:
            raise RuntimeError("only a faiss retriever has an index file to save")
        import faiss

        idx = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and not isinstance(idx, faiss.IndexFlatIP):
            idx = faiss.index_gpu_to_cpu(idx)
        faiss.write_index(idx, path)


@torch.no_grad()
def evaluate(model, split, *, max_len: int, padding: str = "right", ks: Sequence[int] = (20, 50),
             batch_size: int = 512, retriever: str = "auto", device=None,
             max_users: Optional[int] = None) -> Dict[str, float]:
    """Evaluate ``model`` (``user_embeddings(history, mask) -> (B, K, d)``,
    ``item_embeddings() -> (N, d)``) on an EvalSplit. Returns {"recall@k", "ndcg@k",
    "hitrate@k"} averaged over the split's users (the first ``max_users`` when given)."""
    if not isinstance(ks, (list, tuple)) or not ks:
        raise ValueError(f"ks must be a non-empty list of ints, got {ks!r}")
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    ret = Retriever(model.item_embeddings(), retriever)
    topn = max(ks)
    parts, seen = [], 0
    for hist, mask, ptr, tgt in eval_batches(split, max_len=max_len, padding=padding,
                                             batch_size=batch_size, device=device):
        if max_users is not None and seen >= max_users:
            break
        ue = model.user_embeddings(hist, mask)
        recs, _ = ret.recommend(ue, topn)
        parts.append(per_user_metrics(recs, ptr, tgt, ks))
        seen += hist.shape[0]
    model.train(was_training)
    return aggregate(parts)


def evaluate_popularity(item_counts, split, ks: Sequence[int] = (20, 50)) -> Dict[str, float]:
    """Most-popular baseline: everyone gets the items with the highest training counts.
    item_counts: (n_items,) with index 0 = padding."""
    counts = torch.as_tensor(np.asarray(item_counts), dtype=torch.float64).clone()
    counts[0] = -1
    top = counts.topk(max(ks)).indices
    recs = top[None, :].expand(split.n_users, -1)
    return aggregate([per_user_metrics(recs, torch.as_tensor(split.tgt_indptr),
                                       torch.as_tensor(split.tgt_items), ks)])
