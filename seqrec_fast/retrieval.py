"""Multi-interest retrieval: top-N inner-product search over an item table and the merge of
the per-interest lists (ComiRec protocol).

Each of a user's K interests retrieves its top-N items (exact torch matmul + topk, or a faiss
index when ``faiss`` is importable and asked for: exact ``IndexFlatIP``, or the approximate
``IndexIVFFlat`` / ``IndexHNSWFlat``, all with the inner-product metric); the K·N candidates are
merged by score, de-duplicated (an item keeps its best score) and the best N kept. Padding id 0
is never retrieved. Evaluation on top of this lives in ``seqrec_fast.evaluate``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("seqrec_fast.retrieval")

RETRIEVERS = ("auto", "fused", "torch", "faiss")
INDEXES = ("flat", "ivf", "hnsw")
# faiss' k-means asks for at least this many training points per centroid
IVF_MIN_POINTS_PER_LIST = 39
# GPU faiss IVF indexes take at most this many probes (and k)
GPU_MAX_NPROBE = 2048
_said = set()


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def _say_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _said:
        _said.add(msg)
        log.log(level, msg)


def _opt_int(name: str, value, minimum: int, allow_none: bool = True):
    """Check an integer option: int >= minimum (or None when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def default_nlist(n_items: int) -> int:
    """Default number of IVF lists for a catalog of ``n_items`` real items:
    round(4·sqrt(n)), clipped to [1, n // 39] (faiss' k-means wants >= 39 training points per
    list, so catalogs under 78 items get a single list, i.e. an exact scan)."""
    cap = max(1, n_items // IVF_MIN_POINTS_PER_LIST)
    return int(min(max(1, round(4.0 * math.sqrt(max(n_items, 0)))), cap))


def default_nprobe(nlist: int) -> int:
    """Default number of IVF lists scanned per query: max(8, nlist // 8), at most nlist
    (about an eighth of the catalog on large catalogs, a recall-leaning setting)."""
    return int(min(nlist, max(8, nlist // 8)))


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

    item_emb: (n_items, d) with row 0 = padding (never returned; faiss id i is item i+1).
    method:
      "fused": exact, ``seqrec_fast.ops.multi_interest_topk`` — the top-N by max over a user's
        interests straight from the item table (C++ on CPU, Triton on GPU), never a
        (users, n_items) score block; ties go to the smaller id.
      "torch": exact, per-interest matmul + topk in chunks, then the merge (a plain reference).
      "faiss": a faiss index (below), per-interest search, then the merge.
      "auto": "fused" for index="flat"; faiss for an approximate index (the fused exact search
        when faiss is not installed, saying so once in the log).

    index ("fused"/"torch" take "flat" only, anything else is a ValueError):

    - "flat": ``IndexFlatIP``, exact. GPU index when faiss has GPU support and ``use_gpu``.
    - "ivf": ``IndexIVFFlat`` (inner product), its coarse quantizer trained with k-means on the
      item vectors. ``nlist`` lists (default :func:`default_nlist`: round(4·sqrt(n)) clipped to
      [1, n // 39], n = number of real items; an explicit nlist must be <= n, and below 39
      points per list a warning is logged). ``nprobe`` lists scanned per query (default
      :func:`default_nprobe`: max(8, nlist // 8); values above nlist are clipped to nlist, and
      nprobe = nlist is an exact search). Built and searched on the GPU when faiss has GPU support
      and ``use_gpu`` (and nprobe <= 2048, GPU faiss' limit), else on the CPU.
    - "hnsw": ``IndexHNSWFlat`` (inner product) with ``hnsw_m`` neighbours per node (default 32),
      ``ef_construction`` (default 64) at build time and ``ef_search`` (default 128; raised to
      topn for a query asking for more) at search time. HNSW is CPU-only in faiss: ``use_gpu`` is
      ignored for it.

    Options that do not belong to the chosen index are checked for type but otherwise ignored.
    Approximate indexes can find fewer than topn items for a query: :meth:`search` then returns
    id -1 with score -inf in the missing places.
    """

    def __init__(self, item_emb: torch.Tensor, method: str = "auto", use_gpu: bool = True,
                 chunk_elems: int = 1 << 25, *, index: str = "flat", nlist: Optional[int] = None,
                 nprobe: Optional[int] = None, hnsw_m: int = 32, ef_search: int = 128,
                 ef_construction: int = 64):
        if not isinstance(item_emb, torch.Tensor) or item_emb.dim() != 2:
            raise ValueError(f"item_emb must be a (n_items, d) tensor, got "
                             f"{getattr(item_emb, 'shape', type(item_emb))}")
        if method not in RETRIEVERS:
            raise ValueError(f"method must be one of {RETRIEVERS}, got {method!r}")
        if not isinstance(index, str):
            raise TypeError(f"index must be a str, one of {INDEXES}, got {type(index).__name__}")
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        nlist = _opt_int("nlist", nlist, 1)
        nprobe = _opt_int("nprobe", nprobe, 1)
        hnsw_m = _opt_int("hnsw_m", hnsw_m, 2, allow_none=False)
        ef_search = _opt_int("ef_search", ef_search, 1, allow_none=False)
        ef_construction = _opt_int("ef_construction", ef_construction, 1, allow_none=False)
        if method in ("torch", "fused") and index != "flat":
            raise ValueError(f"index={index!r} needs faiss (method='faiss' or 'auto'); "
                             f"method={method!r} is an exact search, use index='flat' with it")
        n_real = item_emb.shape[0] - 1
        if index != "flat" and n_real < 1:
            raise ValueError(f"index={index!r} needs at least one real item (item_emb rows "
                             f"1..), got item_emb of shape {tuple(item_emb.shape)}")
        if index == "ivf" and nlist is not None and nlist > n_real:
            raise ValueError(f"nlist must be <= the number of real items ({n_real}) so that the "
                             f"IVF quantizer can be trained, got {nlist}")
        if method == "auto":
            if index == "flat":
                method = "fused"
            elif faiss_available():
                method = "faiss"
            else:
                method = "fused"
                _say_once(f"faiss is not installed: index={index!r} is ignored, the search is "
                          "exact (pip install 'seqrec_fast[faiss]' for faiss)", logging.WARNING)
                index = "flat"
        elif method == "faiss" and not faiss_available():
            raise RuntimeError("method='faiss' but faiss is not installed "
                               "(pip install 'seqrec_fast[faiss]')")
        self.method = method
        self.index_type = index
        self.items = item_emb.detach().float()
        self._real_rows = None
        self.chunk_elems = chunk_elems
        self.index = None
        self.on_gpu = False
        self.nlist = self.nprobe = None
        self.hnsw_m = self.ef_search = None
        self._gpu_res = None
        if method == "faiss":
            self._build_faiss(index, use_gpu, nlist, nprobe, hnsw_m, ef_search, ef_construction)

    def _build_faiss(self, kind, use_gpu, nlist, nprobe, hnsw_m, ef_search, ef_construction):
        import faiss

        x = np.ascontiguousarray(self.items[1:].cpu().numpy(), dtype=np.float32)
        n, d = x.shape
        gpu_ok = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            if nlist is None:
                nlist = default_nlist(n)
            elif n < IVF_MIN_POINTS_PER_LIST * nlist:
                log.warning("nlist=%d with %d items: fewer than %d training points per list, "
                            "the IVF quantizer may be poor", nlist, n, IVF_MIN_POINTS_PER_LIST)
            nprobe = default_nprobe(nlist) if nprobe is None else min(nprobe, nlist)
            self.nlist, self.nprobe = nlist, nprobe
            index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            index.nprobe = nprobe
            if gpu_ok and nprobe > GPU_MAX_NPROBE:
                log.info("nprobe=%d exceeds GPU faiss' limit of %d: the IVF index stays on the CPU",
                         nprobe, GPU_MAX_NPROBE)
                gpu_ok = False
        else:
            self.hnsw_m, self.ef_search = hnsw_m, ef_search
            index = faiss.index_factory(d, f"HNSW{hnsw_m}", faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
            gpu_ok = False                      # faiss has no GPU HNSW
        if gpu_ok:
            self._gpu_res = faiss.StandardGpuResources()
            dev = self.items.device                 # the items' GPU, not always GPU 0
            gpu = dev.index if dev.type == "cuda" and dev.index is not None else \
                torch.cuda.current_device()
            index = faiss.index_cpu_to_gpu(self._gpu_res, gpu, index)
            if kind == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            self.on_gpu = True
        if kind == "ivf":
            index.train(x)
        index.add(x)
        self.index = index
        log.info("faiss %s index over %d items%s%s", kind, n,
                 f" (nlist={self.nlist}, nprobe={self.nprobe})" if kind == "ivf" else
                 f" (M={hnsw_m}, efSearch={ef_search})" if kind == "hnsw" else "",
                 " on the GPU" if self.on_gpu else "")

    def search(self, queries: torch.Tensor, topn: int):
        """queries: (Q, d) -> ids (Q, min(topn, n_items-1)) int64 (≥ 1, best first), scores
        float32. Approximate indexes put id -1 / score -inf where they found fewer items."""
        n_real = self.items.shape[0] - 1
        k = min(topn, n_real)
        if self.index is not None:
            if k <= 0 or queries.shape[0] == 0:
                return (torch.empty(queries.shape[0], max(k, 0), dtype=torch.int64,
                                    device=queries.device),
                        torch.empty(queries.shape[0], max(k, 0), device=queries.device))
            q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
            if self.index_type == "hnsw" and k > self.ef_search:
                import faiss

                s, i = self.index.search(q, k, params=faiss.SearchParametersHNSW(efSearch=k))
            else:
                s, i = self.index.search(q, k)
            ids = torch.from_numpy(i).long()
            sc = torch.from_numpy(s).float()
            missing = ids < 0                     # faiss' "no result" label
            ids = (ids + 1).masked_fill(missing, -1)
            sc = sc.masked_fill(missing, float("-inf"))
            return ids.to(queries.device), sc.to(queries.device)
        if self.method == "fused":
            return self._fused(queries.detach().float()[:, None, :], k)
        items = self._real(queries.device)
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
        self._check_users(user_emb)
        B, K, d = user_emb.shape
        if self.method == "fused":
            return self._fused(user_emb.detach().float(), topn)
        ids, sc = self.search(user_emb.reshape(B * K, d), topn)
        if K == 1:
            return merge_topn(ids, sc, topn) if ids.shape[1] < topn else (ids, sc)
        return merge_topn(ids.reshape(B, -1), sc.reshape(B, -1), topn)

    def candidates(self, user_emb: torch.Tensor, topn: int):
        """ComiRec's candidate pool for the controllable aggregation: every interest's top-topn
        list, merged by score and de-duplicated (an item keeps its best score).
        user_emb: (B, K, d) -> ids (B, K·topn) int64 (-1 = none), scores float32, best first."""
        self._check_users(user_emb)
        B, K, d = user_emb.shape
        if self.method == "fused":
            from .ops.diverse_topk import interest_candidates

            ids, sc = interest_candidates(user_emb.detach().float(), self._real(user_emb.device),
                                          topn)[::-1]
            return (ids + 1).masked_fill(ids < 0, -1), sc
        ids, sc = self.search(user_emb.reshape(B * K, d), topn)
        return merge_topn(ids.reshape(B, -1), sc.reshape(B, -1), K * ids.shape[1])

    def recommend_diverse(self, user_emb: torch.Tensor, topn: int, categories: torch.Tensor,
                          lam: float):
        """ComiRec's controllable aggregation: from :meth:`candidates`, topn greedy picks each
        maximising score − lam·(picked items of its category) (``seqrec_fast.ops.diverse_topk``;
        lam = 0 is the plain merge). user_emb: (B, K, d), categories: (n_items,) int64 (< 0 =
        unknown: never picked) -> ids (B, topn) int64 (-1 = none), scores float32."""
        from .ops.diverse_topk import diverse_topk

        ids, sc = self.candidates(user_emb, topn)
        cats = torch.as_tensor(categories).to(device=ids.device, dtype=torch.int64)
        if cats.dim() != 1 or cats.shape[0] != self.items.shape[0]:
            raise ValueError(f"categories must have shape (n_items,) = ({self.items.shape[0]},), "
                             f"got {tuple(cats.shape)}")
        out_s, out_i = diverse_topk(sc, ids, cats, topn, lam)
        return out_i, out_s.float()

    def _check_users(self, user_emb):
        if not isinstance(user_emb, torch.Tensor) or user_emb.dim() != 3:
            raise ValueError(f"user_emb must be (batch, K, d), got "
                             f"{getattr(user_emb, 'shape', type(user_emb))}")
        if user_emb.shape[2] != self.items.shape[1]:
            raise ValueError(f"user_emb dim {user_emb.shape[2]} != item_emb dim "
                             f"{self.items.shape[1]}")

    def _real(self, device) -> torch.Tensor:
        """The real items' rows (ids 1..) on ``device``, fp32."""
        if self._real_rows is None or self._real_rows.device != torch.device(device):
            self._real_rows = self.items.to(device)[1:]
        return self._real_rows

    def _fused(self, users: torch.Tensor, k: int):
        """users (B, K, d) fp32 -> ids (B, k) int64 (item ids, -1 = none), scores (B, k)."""
        from .ops.multi_interest_topk import multi_interest_topk

        sc, ix = multi_interest_topk(users, self._real(users.device), k)
        return (ix + 1).masked_fill(ix < 0, -1), sc

    def save(self, path: str) -> None:
        """Write the faiss index (faiss only; any index type, a GPU index is copied to the CPU
        first). ``faiss.read_index(path)`` gives it back; faiss id i is item i+1."""
        if self.index is None:
            raise RuntimeError("only a faiss retriever has an index file to save")
        import faiss

        idx = faiss.index_gpu_to_cpu(self.index) if self.on_gpu else self.index
        faiss.write_index(idx, path)
