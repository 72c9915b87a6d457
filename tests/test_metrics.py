"""Metrics and retrieval against hand-computed examples."""
import math

import pytest
import torch

from seqrec_fast.evaluate import evaluate_popularity
from seqrec_fast.retrieval import Retriever, faiss_available, merge_topn
from seqrec_fast.metrics import aggregate, format_table, per_user_metrics

L2 = lambda i: 1.0 / math.log2(i + 2)  # noqa: E731  discount of 0-based rank i


def test_hand_computed_metrics():
    # user 0: recs [5, 3, 9, 1], targets {3, 1}: hits at ranks 1 and 3
    # user 1: recs [2, 2, 7, 8], targets {8}: hit at rank 3; the repeated 2 counts once
    # user 2: recs [4, -1, 0, 6], targets {4, 4, 7}: targets de-duplicated to {4, 7}
    recs = torch.tensor([[5, 3, 9, 1], [2, 2, 7, 8], [4, -1, 0, 6]])
    ptr = torch.tensor([0, 2, 3, 6])
    tgt = torch.tensor([3, 1, 8, 4, 4, 7])
    m = per_user_metrics(recs, ptr, tgt, ks=(2, 4))
    assert m["recall@2"].tolist() == [0.5, 0.0, 0.5]
    assert m["recall@4"].tolist() == [1.0, 1.0, 0.5]
    assert m["hitrate@2"].tolist() == [1.0, 0.0, 1.0]
    idcg2 = L2(0) + L2(1)
    torch.testing.assert_close(m["ndcg@2"], torch.tensor([L2(1) / idcg2, 0.0, 1.0 / idcg2],
                                                         dtype=torch.float64))
    # IDCG over min(|T|, N): user 1 has one target -> IDCG = 1
    torch.testing.assert_close(m["ndcg@4"], torch.tensor(
        [(L2(1) + L2(3)) / idcg2, L2(3), 1.0 / idcg2], dtype=torch.float64))
    agg = aggregate([m])
    assert agg["recall@4"] == pytest.approx(2.5 / 3)
    assert "recall@4" in format_table({"x": agg}, ks=(2, 4))


def test_padding_never_counts():
    m = per_user_metrics(torch.tensor([[0, 0]]), torch.tensor([0, 1]), torch.tensor([0]), ks=(2,))
    assert m["recall@2"].item() == 0.0


def test_metric_errors():
    with pytest.raises(ValueError, match="recs"):
        per_user_metrics(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="tgt_indptr"):
        per_user_metrics(torch.tensor([[1, 2]]), torch.tensor([0, 1, 2]), torch.tensor([1]), ks=(2,))
    with pytest.raises(ValueError, match="ks"):
        per_user_metrics(torch.tensor([[1, 2]]), torch.tensor([0, 1]), torch.tensor([1]), ks=(5,))


def test_merge_dedup_by_best_score():
    ids = torch.tensor([[4, 7, 1, 7, 0, 4]])
    sc = torch.tensor([[0.9, 0.5, 0.1, 0.8, 5.0, 0.3]])
    out, s = merge_topn(ids, sc, 5)
    assert out.tolist() == [[4, 7, 1, -1, -1]]           # padding 0 excluded, 7 keeps 0.8
    assert s[0, :3].tolist() == pytest.approx([0.9, 0.8, 0.1])


def _retrieval_case():
    # items (row 0 padding with a huge score that must never come back)
    items = torch.tensor([[10.0, 10.0], [1.0, 0.0], [0.0, 1.0], [0.95, 0.1], [0.1, 0.9], [0.45, 0.45]])
    # one user, two interests pointing at the two axes
    user = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    return items, user


def test_torch_retrieval_merges_interests():
    items, user = _retrieval_case()
    r = Retriever(items, "torch")
    ids, sc = r.recommend(user, 3)
    # interest 0 scores: 1:1.0 3:0.95 5:0.45 ; interest 1: 2:2.0 4:1.8 5:0.9 3:0.2
    assert ids.tolist() == [[2, 4, 1]]
    assert sc.tolist()[0] == pytest.approx([2.0, 1.8, 1.0])
    ids, _ = r.recommend(user, 5)
    assert ids.tolist() == [[2, 4, 1, 3, 5]]    # 3 and 5 appear once, with their best score
    with pytest.raises(ValueError, match="user_emb"):
        r.recommend(user[0], 3)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_matches_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    items = torch.randn(500, 16, generator=g)
    users = torch.randn(20, 3, 16, generator=g)
    a = Retriever(items, "torch").recommend(users, 50)[0]
    b = Retriever(items, "faiss", use_gpu=False).recommend(users, 50)[0]
    assert (a == b).float().mean() > 0.99
    Retriever(items, "faiss", use_gpu=False).save(str(tmp_path / "i.faiss"))


def test_faiss_missing_is_said(caplog, monkeypatch):
    import logging

    import seqrec_fast.retrieval as ev

    monkeypatch.setattr(ev, "faiss_available", lambda: False)   # as on a machine without faiss
    with pytest.raises(RuntimeError, match="faiss"):
        ev.Retriever(torch.randn(5, 2), "faiss")

    ev._said.clear()
    with caplog.at_level(logging.INFO, logger="seqrec_fast.retrieval"):
        # the exact search needs no faiss; an approximate index asked for without it is said
        assert ev.Retriever(torch.randn(5, 2), "auto").method == "fused"
        assert not caplog.text
        assert ev.Retriever(torch.randn(5, 2), "auto", index="hnsw").method == "fused"
    assert "faiss is not installed" in caplog.text


def test_popularity_baseline():
    from seqrec_fast.data.preprocess import EvalSplit
    import numpy as np

    split = EvalSplit(np.array([0, 1, 2]), np.array([1, 1]), np.array([0, 1, 3]),
                      np.array([2, 3, 1]))
    counts = np.array([0, 1, 9, 5])            # most popular: 2, then 3, then 1
    m = evaluate_popularity(counts, split, ks=(1, 2))
    assert m["recall@1"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["recall@2"] == pytest.approx((1.0 + 0.5) / 2)


def _diversity_brute(row, cats):
    """ComiRec's compute_diversity over the set of recommended ids (ids < 1 ignored)."""
    items = sorted({i for i in row if i >= 1})
    n = len(items)
    if n < 2:
        return 0.0
    diff = sum(cats[items[i]] != cats[items[j]] for i in range(n) for j in range(i + 1, n))
    return diff / (n * (n - 1) / 2)


def test_diversity_against_brute_force():
    from seqrec_fast.metrics import per_user_diversity

    g = torch.Generator().manual_seed(0)
    cats = torch.randint(-1, 5, (60,), generator=g)
    recs = torch.randint(-1, 60, (40, 12), generator=g)
    recs[0] = -1                       # no items
    recs[1, :] = 7                     # one distinct item
    recs[2, :6] = torch.arange(1, 7)   # k cuts inside
    for k in (None, 1, 5, 12):
        got = per_user_diversity(recs, cats, k)
        want = [_diversity_brute(r[:k].tolist() if k else r.tolist(), cats.tolist())
                for r in recs]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # hand example: categories a, a, b -> pairs (a,a) same, (a,b), (a,b) differ: 2/3
    m = per_user_diversity(torch.tensor([[1, 2, 3, 0]]), torch.tensor([9, 4, 4, 5]))
    assert m.tolist() == [pytest.approx(2 / 3)]


def test_diversity_in_per_user_metrics_and_table():
    recs = torch.tensor([[1, 2, 3, 4]])
    cats = torch.tensor([0, 0, 0, 1, 1])
    m = per_user_metrics(recs, torch.tensor([0, 1]), torch.tensor([2]), ks=(2, 4), categories=cats)
    assert m["diversity@2"].tolist() == [0.0] and m["diversity@4"].tolist() == [pytest.approx(4 / 6)]
    assert "diversity@4" in format_table({"x": aggregate([m])}, ks=(2, 4))
    assert "diversity" not in format_table({"x": {"recall@2": 1.0}}, ks=(2,))


def test_diversity_errors():
    from seqrec_fast.metrics import per_user_diversity

    with pytest.raises(ValueError, match="recs"):
        per_user_diversity(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="categories"):
        per_user_diversity(torch.tensor([[1, 2]]), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="categories has only"):
        per_user_diversity(torch.tensor([[1, 5]]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="k must"):
        per_user_diversity(torch.tensor([[1, 2]]), torch.tensor([0, 1, 2]), 0)
