"""Approximate faiss indexes (IVF, HNSW) against the exact torch search."""
import logging

import numpy as np
import pytest
import torch

import seqrec_fast.retrieval as ev
from seqrec_fast.evaluate import evaluate
from seqrec_fast.retrieval import Retriever, default_nlist, default_nprobe

faiss = pytest.importorskip("faiss")

TOPN = 50


def _clustered(n_items=3000, d=32, n_clusters=30, n_queries=64, seed=0):
    """Items around planted centres (row 0 = padding with a huge norm that would win every
    inner product if it were searched), queries near the same centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3
    assign = torch.randint(0, n_clusters, (n_items,), generator=g)
    items = centres[assign] + torch.randn(n_items, d, generator=g)
    items[0] = 100.0
    q_assign = torch.randint(0, n_clusters, (n_queries,), generator=g)
    queries = centres[q_assign] + torch.randn(n_queries, d, generator=g)
    return items, queries


def _overlap(a, b):
    """Mean per-row |a ∩ b| / |b| of two (Q, N) id tensors (b = the exact answer)."""
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / len(y)
                          for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def case():
    items, queries = _clustered()
    exact_ids, exact_sc = Retriever(items, "torch").search(queries, TOPN)
    return items, queries, exact_ids, exact_sc


def test_defaults():
    assert default_nlist(10) == 1 and default_nlist(77) == 1    # too small to train 2 lists
    assert default_nlist(3000) == 76                              # n // 39 caps 4*sqrt(n)=219
    assert default_nlist(1_000_000) == 4000                       # 4*sqrt(n)
    assert default_nprobe(1) == 1 and default_nprobe(40) == 8
    assert default_nprobe(76) == 9 and default_nprobe(4000) == 500


def test_ivf_full_probe_is_exact(case):
    items, queries, exact_ids, exact_sc = case
    r = Retriever(items, "faiss", use_gpu=False, index="ivf", nlist=40, nprobe=40)
    assert (r.nlist, r.nprobe, r.index_type) == (40, 40, "ivf")
    assert isinstance(r.index, faiss.IndexIVFFlat)
    assert r.index.metric_type == faiss.METRIC_INNER_PRODUCT and r.index.is_trained
    ids, sc = r.search(queries, TOPN)
    assert ids.shape == (queries.shape[0], TOPN) and (ids >= 1).all()
    for a, b in zip(ids, exact_ids):
        assert set(a.tolist()) == set(b.tolist())
    torch.testing.assert_close(sc, exact_sc, atol=1e-3, rtol=1e-4)
    # nprobe above nlist is clipped to nlist: still exact
    r2 = Retriever(items, "faiss", use_gpu=False, index="ivf", nlist=40, nprobe=1000)
    assert r2.nprobe == 40
    assert _overlap(r2.search(queries, TOPN)[0], exact_ids) == 1.0


@pytest.mark.parametrize("kw", [dict(index="ivf", nlist=64, nprobe=8),
                                dict(index="ivf"),
                                dict(index="hnsw", hnsw_m=16, ef_search=128),
                                dict(index="hnsw")])
def test_approximate_recall(case, kw):
    items, queries, exact_ids, _ = case
    r = Retriever(items, "faiss", use_gpu=False, **kw)
    if kw["index"] == "hnsw":
        assert isinstance(r.index, faiss.IndexHNSWFlat)
        assert r.index.metric_type == faiss.METRIC_INNER_PRODUCT
    ids, sc = r.search(queries, TOPN)
    found = ids >= 1
    assert found.float().mean() > 0.99
    assert not (ids == 0).any()
    assert _overlap(ids, exact_ids) >= 0.9
    # the scores returned are the true inner products of the ids returned
    true = (queries[:, None, :] * items[ids.clamp(min=0)]).sum(-1)
    torch.testing.assert_close(sc[found], true[found], atol=1e-3, rtol=1e-4)
    # multi-interest merge goes through the same search
    users = queries[:60].reshape(20, 3, -1)
    recs, _ = r.recommend(users, TOPN)
    exact_recs, _ = Retriever(items, "torch").recommend(users, TOPN)
    assert not (recs == 0).any()
    assert _overlap(recs, exact_recs) >= 0.9


def test_hnsw_topn_above_ef_search(case):
    items, queries, exact_ids, _ = case
    r = Retriever(items, "faiss", use_gpu=False, index="hnsw", ef_search=8)
    ids, _ = r.search(queries, TOPN)            # k = 50 > efSearch = 8: raised to k
    assert (ids >= 1).all()
    assert _overlap(ids, exact_ids) >= 0.9
    assert r.index.hnsw.efSearch == 8           # the stored setting is left alone


def test_missing_results_are_minus_one_never_padding():
    # a single probed list holds fewer than topn items: faiss reports "no result" (-1), which
    # must come back as -1 / -inf and never as the padding id 0
    items, queries = _clustered(n_items=400, n_clusters=8, n_queries=16, seed=1)
    r = Retriever(items, "faiss", use_gpu=False, index="ivf", nlist=10, nprobe=1)
    ids, sc = r.search(queries, 200)
    assert (ids == -1).any()
    assert not (ids == 0).any()
    assert torch.isinf(sc[ids == -1]).all() and (sc[ids == -1] < 0).all()
    assert torch.isfinite(sc[ids >= 1]).all()
    recs, _ = r.recommend(queries[:, None, :], 200)
    assert not (recs == 0).any()


@pytest.mark.parametrize("kw", [dict(index="ivf", nlist=32, nprobe=4),
                                dict(index="hnsw", hnsw_m=8, ef_search=32),
                                dict(index="flat")])
def test_save_load_roundtrip(case, tmp_path, kw):
    items, queries, _, _ = case
    r = Retriever(items, "faiss", use_gpu=False, **kw)
    path = str(tmp_path / f"{kw['index']}.faiss")
    r.save(path)
    loaded = faiss.read_index(path)
    assert type(loaded) is type(r.index) and loaded.ntotal == items.shape[0] - 1
    if kw["index"] == "ivf":
        assert faiss.extract_index_ivf(loaded).nprobe == 4
    if kw["index"] == "hnsw":
        assert loaded.hnsw.efSearch == 32
    q = np.ascontiguousarray(queries.numpy())
    s, i = loaded.search(q, 20)
    ids, sc = r.search(queries, 20)
    np.testing.assert_array_equal(i + 1, ids.numpy())          # faiss id i = item i+1
    np.testing.assert_allclose(s, sc.numpy(), rtol=1e-6, atol=1e-6)


def test_small_catalog_single_list():
    items, queries = _clustered(n_items=30, n_clusters=3, n_queries=5)
    r = Retriever(items, "faiss", use_gpu=False, index="ivf")
    assert r.nlist == 1 and r.nprobe == 1                       # 29 items: one list, exact
    exact = Retriever(items, "torch").search(queries, 10)[0]
    assert _overlap(r.search(queries, 10)[0], exact) == 1.0


def test_explicit_small_nlist_warns(caplog):
    items, _ = _clustered(n_items=100, n_clusters=3, n_queries=1)
    with caplog.at_level(logging.WARNING, logger="seqrec_fast.retrieval"):
        r = Retriever(items, "faiss", use_gpu=False, index="ivf", nlist=10)
    assert r.nlist == 10 and "fewer than 39 training points" in caplog.text


@pytest.mark.parametrize("kw, exc, match", [
    (dict(index="ivfpq"), ValueError, "index"),
    (dict(index=3), TypeError, "index"),
    (dict(method="torch", index="ivf"), ValueError, "index"),
    (dict(method="torch", index="hnsw"), ValueError, "index"),
    (dict(index="ivf", nlist=0), ValueError, "nlist"),
    (dict(index="ivf", nlist=2.5), TypeError, "nlist"),
    (dict(index="ivf", nlist=True), TypeError, "nlist"),
    (dict(index="ivf", nlist=10_000), ValueError, "nlist"),
    (dict(index="ivf", nprobe=0), ValueError, "nprobe"),
    (dict(index="ivf", nprobe="8"), TypeError, "nprobe"),
    (dict(index="hnsw", hnsw_m=1), ValueError, "hnsw_m"),
    (dict(index="hnsw", hnsw_m=None), TypeError, "hnsw_m"),
    (dict(index="hnsw", ef_search=0), ValueError, "ef_search"),
    (dict(index="hnsw", ef_construction=0), ValueError, "ef_construction"),
])
def test_bad_arguments(kw, exc, match):
    items, _ = _clustered(n_items=200, n_clusters=3, n_queries=1)
    kw = dict(kw)
    method = kw.pop("method", "faiss")
    with pytest.raises(exc, match=match):
        Retriever(items, method, use_gpu=False, **kw)


def test_no_real_items():
    with pytest.raises(ValueError, match="real item"):
        Retriever(torch.randn(1, 4), "faiss", use_gpu=False, index="hnsw")


def test_auto_without_faiss_falls_back_to_exact(monkeypatch, caplog):
    monkeypatch.setattr(ev, "faiss_available", lambda: False)
    ev._said.clear()
    with caplog.at_level(logging.INFO, logger="seqrec_fast.retrieval"):
        r = Retriever(torch.randn(20, 4), "auto", index="ivf")
    assert r.method == "fused" and r.index_type == "flat"
    assert "index='ivf' is ignored" in caplog.text


class _Model(torch.nn.Module):
    """Two interests = the embeddings of the last two history items (so the targets of a
    clustered history are found), items = the clustered table."""

    def __init__(self, items):
        super().__init__()
        self.emb = torch.nn.Parameter(items.clone())

    def item_embeddings(self):
        return self.emb

    def user_embeddings(self, hist, mask):
        return torch.stack([self.emb[hist[:, 0]], self.emb[hist[:, 1]]], 1)


def test_evaluate_passes_the_index_through(monkeypatch):
    from seqrec_fast.data.preprocess import EvalSplit

    items, _ = _clustered(n_items=2000, n_clusters=20)
    g = np.random.default_rng(0)
    n_users = 40
    hist = g.integers(1, 2000, size=(n_users, 2))
    tgt = g.integers(1, 2000, size=(n_users, 3))
    split = EvalSplit(np.arange(0, 2 * n_users + 1, 2), hist.reshape(-1),
                      np.arange(0, 3 * n_users + 1, 3), tgt.reshape(-1))
    model = _Model(items).train()
    seen = []
    real = ev.Retriever

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    import seqrec_fast.evaluate as evaluation

    monkeypatch.setattr(evaluation, "Retriever", spy)
    exact = evaluate(model, split, max_len=2, ks=(20, 50), retriever="torch")
    full = evaluate(model, split, max_len=2, ks=(20, 50), retriever="faiss", index="ivf",
                    nlist=16, nprobe=16)
    approx = evaluate(model, split, max_len=2, ks=(20, 50), retriever="faiss", index="hnsw",
                      hnsw_m=16, ef_search=40)
    assert seen[1]["index"] == "ivf" and seen[1]["nlist"] == 16 and seen[1]["nprobe"] == 16
    assert seen[2]["index"] == "hnsw" and seen[2]["hnsw_m"] == 16 and seen[2]["ef_search"] == 40
    assert full == pytest.approx(exact)
    assert approx["recall@50"] == pytest.approx(exact["recall@50"], abs=0.05)
    assert model.training                    # mode restored
    with pytest.raises(ValueError, match="index"):
        evaluate(model, split, max_len=2, retriever="torch", index="hnsw")
    assert model.training                    # restored after an error too
