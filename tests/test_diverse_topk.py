"""diverse_topk (ComiRec's controllable aggregation) and interest_candidates: every backend
against the literal per-user loop, planted ties, lam = 0 as the plain merge, odd shapes and bad
inputs."""
from __future__ import annotations

import pytest
import torch

from _util import comirec_merge, fused_backends
from seqrec_fast.ops.diverse_topk import _diverse_topk_op, diverse_topk, interest_candidates
from seqrec_fast.ops.multi_interest_topk import multi_interest_topk
from seqrec_fast.reference.diverse_topk import diverse_topk_ref

FUSED = fused_backends("diverse_topk")
ALL = ["eager"] + FUSED
LAMS = [0.0, 0.05, 0.3, 1.0, 7.0]


def make(U, M, N, n_cat, *, seed=0, levels=None, invalid=True):
    """Candidates sorted by score (as multi_interest_topk returns them), some -1 places at the
    end, some items without a category. ``levels``: scores on a coarse grid (many ties)."""
    g = torch.Generator().manual_seed(seed)
    cats = torch.randint(0, n_cat, (N,), generator=g)
    if invalid:
        cats[torch.rand(N, generator=g) < 0.1] = -1
    ids = torch.stack([torch.randperm(N, generator=g)[:M] for _ in range(U)])
    if levels:
        s = torch.randint(0, levels, (U, M), generator=g).float() / levels
    else:
        s = torch.randn(U, M, generator=g)
    s, order = s.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, order)
    if invalid and U > 1:
        ids[0, M - M // 4:] = -1
        s[0, M - M // 4:] = float("-inf")
    return s, ids, cats


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("shape", [(1, 5, 9, 2, 3), (6, 40, 90, 5, 20), (5, 33, 40, 3, 50),
                                   (4, 64, 100, 1, 10), (3, 17, 30, 17, 17)])
def test_against_literal_loop(backend, lam, shape):
    U, M, N, n_cat, n = shape
    for levels in (None, 4):
        s, ids, cats = make(U, M, N, n_cat, levels=levels, seed=U + M)
        want_s, want_i = diverse_topk_ref(s, ids, cats, n, lam)
        got_s, got_i = diverse_topk(s, ids, cats, n, lam, backend=backend)
        assert got_s.dtype == s.dtype and got_i.dtype == torch.int64
        assert torch.equal(got_i, want_i), (levels, got_i, want_i)
        assert torch.equal(got_s, want_s)


@pytest.mark.parametrize("backend", ALL)
def test_lam_zero_is_plain_merge(backend):
    s, ids, cats = make(3, 30, 60, 4, invalid=False)
    got_s, got_i = diverse_topk(s, ids, cats, 12, 0.0, backend=backend)
    assert torch.equal(got_i, ids[:, :12]) and torch.equal(got_s, s[:, :12])


@pytest.mark.parametrize("backend", ALL)
def test_planted_ties_and_penalty(backend):
    # categories: items 0-2 -> 0, items 3-5 -> 1, item 6 -> none
    cats = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    ids = torch.tensor([[0, 1, 6, 3, 2, 4, 5, -1]])
    s = torch.tensor([[1.0, 0.9, 0.9, 0.8, 0.5, 0.5, 0.4, float("-inf")]])
    # lam = 0.2: pick 0 (1.0); then 1: 0.9-0.2=0.7 vs 3: 0.8 -> 3; then 1 (0.7) vs 4 (0.3) -> 1;
    # then 2: 0.5-0.4=0.1, 4: 0.5-0.2=0.3, 5: 0.4-0.2=0.2 -> 4; then 5: 0.4-0.4=0.0 vs 2: 0.1
    # -> 2; then 5; item 6 has no category and is never picked.
    got_s, got_i = diverse_topk(s, ids, cats, 7, 0.2, backend=backend)
    assert got_i.tolist() == [[0, 3, 1, 4, 2, 5, -1]]
    assert got_s[0, -1] == float("-inf")
    # an exact tie of adjusted scores goes to the earlier candidate (binary-exact values)
    s2 = torch.tensor([[1.0, 0.75, 0.5, 0.5]], dtype=torch.float64)
    ids2 = torch.tensor([[0, 1, 3, 4]])
    got_s, got_i = diverse_topk(s2, ids2, cats, 4, 0.25, backend=backend)
    # round 2: item 1 -> 0.75 - 0.25 = 0.5 ties items 3 (0.5): item 1 comes first in the list
    assert got_i.tolist() == [[0, 1, 3, 4]]


@pytest.mark.parametrize("backend", ALL)
def test_unsorted_rows_are_sorted_stably(backend):
    cats = torch.tensor([0, 1, 2, 3, 4])
    s = torch.tensor([[0.1, 0.5, 0.5, 0.9, float("nan")]])
    ids = torch.tensor([[0, 2, 1, 3, 4]])
    got_s, got_i = diverse_topk(s, ids, cats, 5, 0.0, backend=backend)
    assert got_i.tolist() == [[3, 2, 1, 0, -1]]          # equal scores keep row order; NaN dropped
    want = diverse_topk_ref(s, ids, cats, 5, 0.0)
    assert torch.equal(got_i, want[1])


@pytest.mark.parametrize("backend", ALL)
def test_odd_shapes(backend):
    cats = torch.tensor([0, 1])
    s, i = diverse_topk(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int64), cats, 3, 0.5,
                        backend=backend)
    assert s.shape == i.shape == (0, 3)
    s, i = diverse_topk(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.int64), cats, 3, 0.5,
                        backend=backend)
    assert (i == -1).all() and torch.isneginf(s).all()
    s, i = diverse_topk(torch.tensor([[2.0, 1.0]]), torch.tensor([[-1, -1]]), cats, 1, 0.5,
                        backend=backend)
    assert i.tolist() == [[-1]]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    s, ids, cats = make(4, 20, 50, 3, levels=8)
    s = s.to(dtype)
    want = diverse_topk_ref(s, ids, cats.int(), 10, 0.125)
    got = diverse_topk(s, ids, cats.int(), 10, 0.125, backend=backend)
    assert got[0].dtype == dtype
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend", ALL)
def test_interest_candidates_is_comirec_union(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 3, 8, generator=g)
    it = torch.randn(80, 8, generator=g)
    n = 6
    s, i = interest_candidates(q, it, n, backend=backend)
    assert s.shape == (5, 18)
    union = comirec_merge(q, it, n, keep=3 * n)            # the whole de-duplicated union
    for u in range(5):
        want = [j for j, _ in union[u]]
        got = [x for x in i[u].tolist() if x >= 0]
        assert got == want
        assert (i[u, len(want):] == -1).all()
    # its first n are multi_interest_topk's answer
    _, top = multi_interest_topk(q, it, n, backend=backend)
    assert torch.equal(i[:, :n], top)


def test_pipeline_with_multi_interest_topk():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(7, 4, 16, generator=g)
    it = torch.randn(300, 16, generator=g)
    cats = torch.randint(0, 6, (300,), generator=g)
    s, i = multi_interest_topk(q, it, 40)
    for backend in ALL:
        got = diverse_topk(s, i, cats, 20, 0.5, backend=backend)
        want = diverse_topk_ref(s, i, cats, 20, 0.5)
        assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    s, ids, cats = make(3, 12, 30, 3)
    torch.library.opcheck(_diverse_topk_op, (s, ids, cats, 5, 0.5, backend))


def test_torch_compile_fullgraph():
    backend = "cpp" if "cpp" in FUSED else "eager"
    torch._dynamo.reset()
    s, ids, cats = make(3, 12, 30, 3)

    def f(s, ids, cats):
        return diverse_topk(s, ids, cats, 5, 0.5, backend=backend)

    got = torch.compile(f, fullgraph=True)(s, ids, cats)
    want = f(s, ids, cats)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs():
    s, ids, cats = make(2, 5, 10, 2)
    f = diverse_topk
    with pytest.raises(ValueError, match="scores"):
        f(s[0], ids, cats, 3, 0.1)
    with pytest.raises(TypeError, match="scores"):
        f(ids, ids, cats, 3, 0.1)
    with pytest.raises(TypeError, match="ids"):
        f(s, ids.int(), cats, 3, 0.1)
    with pytest.raises(ValueError, match="ids"):
        f(s, ids[:, :3], cats, 3, 0.1)
    with pytest.raises(ValueError, match="ids"):
        f(s, ids.clamp(max=5) + 20, cats, 3, 0.1)
    with pytest.raises(TypeError, match="categories"):
        f(s, ids, cats.float(), 3, 0.1)
    with pytest.raises(ValueError, match="categories"):
        f(s, ids, cats[None], 3, 0.1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        f(s, ids, cats, 0, 0.1)
    with pytest.raises(ValueError, match="lam"):
        f(s, ids, cats, 3, -0.1)
    with pytest.raises(ValueError, match="lam"):
        f(s, ids, cats, 3, float("inf"))
    with pytest.raises(TypeError, match="lam"):
        f(s, ids, cats, 3, "0.1")


@pytest.mark.cuda
@pytest.mark.parametrize("lam", LAMS)
def test_cuda_triton_against_literal_loop(lam):
    for levels in (None, 4):
        s, ids, cats = make(9, 100, 300, 6, levels=levels)
        want = diverse_topk_ref(s, ids, cats, 30, lam)
        got = diverse_topk(s.cuda(), ids.cuda(), cats.cuda(), 30, lam, backend="triton")
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


def test_bad_n_and_backend_name_the_argument():
    s, ids, cats = make(2, 5, 10, 2)
    with pytest.raises(TypeError, match="n must be an int"):
        diverse_topk(s, ids, cats, 2.0, 0.1)
    with pytest.raises(TypeError, match="n must be an int"):
        diverse_topk(s, ids, cats, True, 0.1)
    with pytest.raises(ValueError, match="backend"):
        diverse_topk(s, ids, cats, 2, 0.1, backend="fast")
    with pytest.raises(ValueError, match="n must be >= 1"):
        interest_candidates(torch.randn(2, 3, 4), torch.randn(6, 4), 0)
