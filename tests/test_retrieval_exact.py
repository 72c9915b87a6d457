"""The exact retrieval paths of ``Retriever`` (fused multi_interest_topk, chunked torch), the
candidate pool and the controllable aggregation, and the evaluation's Diversity@k and λ."""
import numpy as np
import pytest
import torch

from seqrec_fast.data.preprocess import EvalSplit
from seqrec_fast.evaluate import evaluate, evaluate_popularity
from seqrec_fast.metrics import per_user_diversity
from seqrec_fast.retrieval import Retriever


def _data(n_items=400, d=16, users=7, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items, d, generator=g)
    items[0] = 50.0                                   # padding: would win every product
    users_emb = torch.randn(users, K, d, generator=g)
    return items, users_emb


def _greedy(scores, ids, cats, n, lam):
    """The aggregation loop as ComiRec writes it, one user at a time (independent of the op)."""
    order = sorted(range(len(ids)), key=lambda j: -scores[j])        # stable: ties keep order
    cand = [(ids[j], scores[j]) for j in order if ids[j] >= 1 and cats[ids[j]] >= 0]
    picked, count = [], {}
    for _ in range(min(n, len(cand))):
        best, best_v = None, None
        for j, (i, s) in enumerate(cand):
            v = s - lam * count.get(cats[i], 0)
            if best_v is None or v > best_v:
                best, best_v = j, v
        i, _ = cand.pop(best)
        picked.append(i)
        count[cats[i]] = count.get(cats[i], 0) + 1
    return picked + [-1] * (n - len(picked))


def test_fused_is_the_exact_torch_search():
    items, users = _data()
    fused, exact = Retriever(items, "fused"), Retriever(items, "torch")
    assert Retriever(items, "auto").method == "fused"
    for topn in (1, 10, 399, 450):                     # 450 > real items: padded with -1
        a_i, a_s = fused.recommend(users, topn)
        b_i, b_s = exact.recommend(users, topn)
        assert torch.equal(a_i, b_i), topn
        assert torch.allclose(a_s, b_s, atol=1e-5)
        assert not (a_i == 0).any()                   # padding never retrieved
    q = users[:, 0]
    a_i, a_s = fused.search(q, 25)
    b_i, b_s = exact.search(q, 25)
    assert torch.equal(a_i, b_i) and torch.allclose(a_s, b_s, atol=1e-5)


def test_candidates_are_the_merged_per_interest_lists():
    items, users = _data()
    fused, exact = Retriever(items, "fused"), Retriever(items, "torch")
    a_i, a_s = fused.candidates(users, 20)
    b_i, b_s = exact.candidates(users, 20)
    assert a_i.shape == (7, 60)
    for u in range(users.shape[0]):
        per = [set((users[u, k] @ items[1:].T).topk(20).indices.add(1).tolist()) for k in range(3)]
        want = set().union(*per)
        assert set(a_i[u][a_i[u] > 0].tolist()) == want == set(b_i[u][b_i[u] > 0].tolist())
    assert torch.all(a_s[:, :-1] >= a_s[:, 1:])        # best first


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.5, 3.0])
def test_recommend_diverse_is_comirec_greedy(lam):
    items, users = _data()
    cats = torch.randint(0, 5, (items.shape[0],), generator=torch.Generator().manual_seed(1))
    cats[7] = -1                                       # unknown category: never picked
    r = Retriever(items, "fused")
    ids, sc = r.recommend_diverse(users, 15, cats, lam)
    c_i, c_s = r.candidates(users, 15)
    for u in range(users.shape[0]):
        want = _greedy(c_s[u].double().tolist(), c_i[u].tolist(), cats.tolist(), 15, lam)
        assert ids[u].tolist() == want, (u, lam)
    if lam == 0.0:
        plain, _ = r.recommend(users, 15)
        keep = cats[plain.clamp(min=0)] >= 0
        assert all(ids[u][:int(keep[u].sum())].tolist() == plain[u][keep[u]].tolist()
                   for u in range(users.shape[0]))
    with pytest.raises(ValueError, match="categories"):
        r.recommend_diverse(users, 15, cats[:-1], lam)


class _Model(torch.nn.Module):
    """Interests = the embeddings of the history items (one per position)."""

    def __init__(self, items):
        super().__init__()
        self.emb = torch.nn.Parameter(items.clone())

    def item_embeddings(self):
        return self.emb

    def user_embeddings(self, hist, mask):
        return self.emb[hist]


def _split(n_items, users=60, hist=3, tgt=4, seed=0):
    g = np.random.default_rng(seed)
    return EvalSplit(np.arange(0, hist * users + 1, hist),
                     g.integers(1, n_items, size=users * hist),
                     np.arange(0, tgt * users + 1, tgt), g.integers(1, n_items, size=users * tgt))


def test_evaluate_diversity_and_lambda():
    items, _ = _data(n_items=300)
    cats = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(2))
    model, split = _Model(items), _split(300)
    plain = evaluate(model, split, max_len=3, ks=(5, 10))
    with_div = evaluate(model, split, max_len=3, ks=(5, 10), categories=cats)
    for k in (5, 10):
        assert with_div[f"recall@{k}"] == plain[f"recall@{k}"]
        recs, _ = Retriever(items, "fused").recommend(model.user_embeddings(
            torch.as_tensor(split.hist_items.reshape(60, 3)), None), k)
        assert with_div[f"diversity@{k}"] == pytest.approx(
            float(per_user_diversity(recs, cats).mean()), abs=1e-12)
    lam0 = evaluate(model, split, max_len=3, ks=(5, 10), categories=cats, lam=0.0)
    assert lam0 == pytest.approx(with_div, abs=1e-12)              # λ = 0 is the plain merge
    divs = [evaluate(model, split, max_len=3, ks=(10,), categories=cats, lam=lam)["diversity@10"]
            for lam in (0.0, 0.1, 1.0, 10.0)]
    assert divs == sorted(divs) and divs[-1] > divs[0]
    pop = evaluate_popularity(np.ones(300), split, ks=(5,), categories=cats)
    assert "diversity@5" in pop
    with pytest.raises(ValueError, match="categories"):
        evaluate(model, split, max_len=3, ks=(5,), lam=0.1)
    with pytest.raises(ValueError, match="lam"):
        evaluate(model, split, max_len=3, ks=(5,), categories=cats, lam=-1.0)


def test_evaluate_lambda_list_is_one_pass_with_the_same_numbers():
    """A list of λ gives, per λ, exactly the single-λ result, from one pass: the user
    embeddings are computed once per batch, not once per λ."""
    items, _ = _data(n_items=300)
    cats = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(3))
    model, split = _Model(items), _split(300, users=70)
    calls = []
    inner = model.user_embeddings
    model.user_embeddings = lambda h, m: (calls.append(h.shape[0]), inner(h, m))[1]
    lams = [0.0, 0.2, 2.0]
    many = evaluate(model, split, max_len=3, ks=(5, 10), categories=cats, lam=lams,
                    batch_size=32)
    assert sum(calls) == 70                                     # one pass over the users
    assert isinstance(many, list) and len(many) == 3
    for x, got in zip(lams, many):
        one = evaluate(model, split, max_len=3, ks=(5, 10), categories=cats, lam=x,
                       batch_size=32)
        assert got == one, x
    assert isinstance(evaluate(model, split, max_len=3, ks=(5,), categories=cats, lam=(0.1,)),
                      list)
    with pytest.raises(ValueError, match="lam"):
        evaluate(model, split, max_len=3, ks=(5,), categories=cats, lam=[])
    with pytest.raises(ValueError, match="lam"):
        evaluate(model, split, max_len=3, ks=(5,), categories=cats, lam=[0.1, float("nan")])


@pytest.mark.cuda
def test_evaluate_takes_categories_on_the_gpu():
    """categories given as a CUDA tensor (np.asarray cannot read one) give the CPU result."""
    items, _ = _data(n_items=300)
    cats = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(4))
    model, split = _Model(items), _split(300)
    want = evaluate(model, split, max_len=3, ks=(5,), categories=cats, lam=0.1)
    got = evaluate(model, split, max_len=3, ks=(5,), categories=cats.cuda(), lam=0.1)
    assert got == pytest.approx(want, abs=1e-12)
    assert evaluate_popularity(np.ones(300), split, ks=(5,), categories=cats.cuda()) == \
        evaluate_popularity(np.ones(300), split, ks=(5,), categories=cats)
