"""multi_interest_topk: every backend against the float64 reference and against ComiRec's merge
of per-interest top-n lists, with planted ties, odd shapes, every dtype and bad inputs.

Exact comparisons use small-integer embeddings: their dot products are exact in fp32 (and in
bf16/fp16 inputs), so every backend must return bit-identical scores and the same ids.
"""
from __future__ import annotations

import pytest
import torch

from _util import comirec_merge, fused_backends
from seqrec_fast.ops.multi_interest_topk import _multi_interest_topk_op, multi_interest_topk
from seqrec_fast.reference.multi_interest_topk import multi_interest_topk_ref

FUSED = fused_backends("multi_interest_topk")
ALL = ["eager"] + FUSED
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (U, K, N, d, n); the interpreter is slow: Triton gets the small ones
SHAPES = [
    (1, 1, 5, 3, 2),        # U=1, K=1
    (5, 3, 37, 8, 7),       # N not a multiple of any tile
    (4, 2, 10, 4, 16),      # n > N: padding
    (19, 4, 70, 24, 5),     # several user blocks in the interpreter, d=24
    (3, 7, 40, 16, 33),     # K=7, n not a power of two
]
BIG_SHAPES = [(70, 4, 1200, 16, 50), (33, 2, 1030, 8, 3)]  # several tiles of the C++ kernel


def make(shape, *, seed=0, levels=2, mask_p=0.7, exclude_e=0):
    """Small-integer interests/items (exact scores, many ties), an interest mask with one
    fully masked user, and optionally an (U, E) exclude list padded with -1."""
    U, K, N, d, n = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-levels, levels + 1, (U, K, d), generator=g).float()
    it = torch.randint(-levels, levels + 1, (N, d), generator=g).float()
    mask = torch.rand(U, K, generator=g) < mask_p
    mask[:, 0] |= torch.rand(U, generator=g) < 0.5
    if U > 2:
        mask[1] = False
    ex = None
    if exclude_e:
        ex = torch.randint(-1, N, (U, exclude_e), generator=g)
    return q, it, mask, ex


def check_exact(backend, shape, dtype, **kw):
    q, it, mask, ex = make(shape, **kw)
    want_s, want_i = multi_interest_topk_ref(q.double(), it.double(), shape[-1],
                                             interest_mask=mask, exclude=ex)
    s, i = multi_interest_topk(q.to(dtype), it.to(dtype), shape[-1], interest_mask=mask,
                               exclude=ex, backend=backend)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.shape == i.shape == (shape[0], shape[-1])
    bad = (i != want_i) | (s.double() != want_s)
    assert not bool(bad.any()), (f"{backend} {dtype} {shape}: first mismatch at "
                                 f"{bad.nonzero()[0].tolist()}: got ids {i[bad][:5].tolist()} "
                                 f"scores {s[bad][:5].tolist()}, want ids {want_i[bad][:5].tolist()}"
                                 f" scores {want_s[bad][:5].tolist()}")
    return s, i


# the interpreter is slow: at the larger shapes Triton runs fp32 only (every dtype at the others)
EXACT_CASES = [(b, dt, sh) for sh in SHAPES for dt in DTYPES for b in ALL
               if not (b == "triton" and sh[0] * sh[2] > 800 and dt != torch.float32)]


@pytest.mark.parametrize("backend, dtype, shape", EXACT_CASES)
def test_exact_against_reference(backend, dtype, shape):
    check_exact(backend, shape, dtype, exclude_e=3 if shape[2] > 10 else 0)


@pytest.mark.parametrize("backend", [b for b in ALL if b != "triton"])
@pytest.mark.parametrize("shape", BIG_SHAPES)
def test_exact_many_tiles(backend, shape):
    check_exact(backend, shape, torch.float32, exclude_e=6)
    check_exact(backend, shape, torch.bfloat16, levels=1)   # levels=1: heavy ties


@pytest.mark.parametrize("backend", ALL)
def test_equals_comirec_merge(backend):
    """Scores and ids equal ComiRec's merge up to the order inside runs of tied scores (the
    merge keeps list order there, this op the smaller id): compare as {score: set of ids} on
    every fully returned score level, and the scores position by position."""
    shape = (6, 3, 45, 6, 8)
    q, it, mask, _ = make(shape, seed=3)
    s, i = multi_interest_topk(q, it, shape[-1], interest_mask=mask, backend=backend)
    merged = comirec_merge(q, it, shape[-1], mask)
    for u in range(shape[0]):
        got = [(int(a), float(b)) for a, b in zip(i[u], s[u]) if a >= 0]
        want = merged[u]
        assert [v for _, v in got] == [v for _, v in want], u
        last = want[-1][1] if want else None
        for v in {v for _, v in want if v != last}:
            assert {a for a, b in got if b == v} == {a for a, b in want if b == v}, (u, v)


def test_comirec_merge_order_with_distinct_scores():
    """Without ties the two are identical, position by position (random continuous data)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 3, 8, generator=g, dtype=torch.float64)
    it = torch.randn(60, 8, generator=g, dtype=torch.float64)
    merged = comirec_merge(q, it, 10)
    for backend in ALL:
        s, i = multi_interest_topk(q.float(), it.float(), 10, backend=backend)
        for u in range(4):
            assert i[u].tolist() == [a for a, _ in merged[u]], (backend, u)
            torch.testing.assert_close(s[u].double(), torch.tensor([v for _, v in merged[u]],
                                                                   dtype=torch.float64),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_planted_ties_go_to_smaller_id(backend):
    # items 2, 5, 9 identical (best for interest 0), items 7 and 3 identical (best for interest 1)
    it = torch.zeros(12, 4)
    it[[2, 5, 9], 0] = 3.0
    it[[7, 3], 1] = 2.0
    it[[0, 1, 4, 6, 8, 10, 11], 2] = 1.0
    q = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    s, i = multi_interest_topk(q, it, 6, backend=backend)
    assert i.tolist() == [[2, 5, 9, 3, 7, 0]]
    assert s.tolist() == [[3.0, 3.0, 3.0, 2.0, 2.0, 0.0]]
    # cut inside a tie run: the smaller ids win
    s, i = multi_interest_topk(q, it, 2, backend=backend)
    assert i.tolist() == [[2, 5]]


@pytest.mark.parametrize("backend", ALL)
def test_padding_masked_and_exclusions(backend):
    q, it, _, _ = make((3, 2, 6, 4, 10))
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    ex = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1], [5, 4, 3, 2]])
    s, i = multi_interest_topk(q, it, 10, interest_mask=mask, exclude=ex, backend=backend)
    assert (i[0, :4] >= 2).all() and (i[0, 4:] == -1).all()         # 6 items, 2 excluded
    assert (i[1] == -1).all() and torch.isneginf(s[1]).all()        # every interest masked
    assert sorted(i[2, :2].tolist()) == [0, 1] and (i[2, 2:] == -1).all()
    assert torch.isneginf(s[i == -1]).all() and torch.isfinite(s[i >= 0]).all()
    # a 1-D exclude applies to every user
    s1, i1 = multi_interest_topk(q, it, 10, exclude=torch.tensor([0]), backend=backend)
    assert not (i1 == 0).any() and (i1[:, :5] >= 1).all()


@pytest.mark.parametrize("backend", ALL)
def test_empty_users_and_items(backend):
    s, i = multi_interest_topk(torch.zeros(0, 2, 4), torch.randn(5, 4), 3, backend=backend)
    assert s.shape == i.shape == (0, 3)
    s, i = multi_interest_topk(torch.randn(2, 2, 4), torch.zeros(0, 4), 3, backend=backend)
    assert (i == -1).all() and torch.isneginf(s).all()


@pytest.mark.parametrize("backend", ALL)
def test_nan_items_never_returned(backend):
    it = torch.eye(4)
    it[1] = float("nan")
    q = torch.ones(1, 2, 4)
    s, i = multi_interest_topk(q, it, 4, backend=backend)
    assert i.tolist() == [[0, 2, 3, -1]]
    # a NaN in one interest makes every score of that interest NaN: the max propagates it
    # (as torch.amax does) unless the interest is masked
    q = torch.ones(2, 3, 4)
    q[:, 1, 2] = float("nan")
    mask = torch.tensor([[True, True, True], [True, False, True]])
    s, i = multi_interest_topk(q, torch.eye(4), 2, interest_mask=mask, backend=backend)
    assert i.tolist() == [[-1, -1], [0, 1]]


@pytest.mark.parametrize("backend", [b for b in ALL if b != "triton"])
def test_random_continuous_close_to_float64(backend):
    """Random continuous fp32 data: the returned scores are the float64 top scores within fp32
    rounding, and every returned id really has (about) the returned score."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(50, 4, 32, generator=g)
    it = torch.randn(3000, 32, generator=g)
    s, i = multi_interest_topk(q, it, 20, backend=backend)
    ws, wi = multi_interest_topk_ref(q.double(), it.double(), 20)
    torch.testing.assert_close(s.double(), ws, atol=1e-4, rtol=1e-5)
    true = torch.einsum("ukd,nd->ukn", q.double(), it.double()).amax(1).gather(1, i)
    torch.testing.assert_close(s.double(), true, atol=1e-4, rtol=1e-5)
    assert (i == wi).float().mean() > 0.99


def test_no_grad_outputs():
    q = torch.randn(2, 2, 4, requires_grad=True)
    it = torch.randn(7, 4, requires_grad=True)
    for backend in ALL:
        s, i = multi_interest_topk(q, it, 3, backend=backend)
        assert not s.requires_grad and not i.requires_grad


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    q, it, mask, ex = make((4, 2, 20, 8, 5), exclude_e=2)
    torch.library.opcheck(_multi_interest_topk_op, (q, it, 5, mask, ex, backend))
    torch.library.opcheck(_multi_interest_topk_op, (q, it, 5, None, None, backend))


def test_torch_compile_fullgraph():
    backend = "cpp" if "cpp" in FUSED else "eager"
    torch._dynamo.reset()
    q, it, mask, ex = make((5, 3, 30, 8, 6), exclude_e=2)

    def f(q, it, mask, ex):
        s, i = multi_interest_topk(q, it, 6, interest_mask=mask, exclude=ex, backend=backend)
        return s * 2, i + 1

    got = torch.compile(f, fullgraph=True)(q, it, mask, ex)
    want = f(q, it, mask, ex)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_inputs():
    q, it = torch.randn(2, 3, 4), torch.randn(6, 4)
    f = multi_interest_topk
    with pytest.raises(ValueError, match="interests"):
        f(torch.randn(2, 4), it, 3)
    with pytest.raises(TypeError, match="interests"):
        f(q.double(), it.double(), 3)
    with pytest.raises(TypeError, match="interests"):
        f([[1.0]], it, 3)
    with pytest.raises(ValueError, match="items"):
        f(q, torch.randn(6, 5), 3)
    with pytest.raises(ValueError, match="items"):
        f(q, torch.randn(6), 3)
    with pytest.raises(TypeError, match="items"):
        f(q, it.half(), 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        f(q, it, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        f(q, it, 2.0)
    with pytest.raises(ValueError, match="interests"):
        f(torch.randn(2, 0, 4), it, 3)
    with pytest.raises(ValueError, match="interest_mask"):
        f(q, it, 3, interest_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="interest_mask"):
        f(q, it, 3, interest_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="exclude"):
        f(q, it, 3, exclude=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="exclude"):
        f(q, it, 3, exclude=torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="exclude"):
        f(q, it, 3, exclude=torch.tensor([[6], [0]]))
    with pytest.raises(ValueError, match="exclude"):
        f(q, it, 3, exclude=torch.tensor([[-2], [0]]))
    with pytest.raises(ValueError, match="backend"):
        f(q, it, 3, backend="fast")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES)
def test_cuda_triton_exact(dtype, shape):
    q, it, mask, ex = make(shape, exclude_e=3)
    want_s, want_i = multi_interest_topk_ref(q.double(), it.double(), shape[-1],
                                             interest_mask=mask, exclude=ex)
    s, i = multi_interest_topk(q.to("cuda", dtype), it.to("cuda", dtype), shape[-1],
                               interest_mask=mask.cuda(), exclude=ex.cuda(), backend="triton")
    assert torch.equal(i.cpu(), want_i) and torch.equal(s.cpu().double(), want_s)
    s, i = multi_interest_topk(q.to("cuda", dtype), it.to("cuda", dtype), shape[-1])
    want_s, want_i = multi_interest_topk_ref(q.double(), it.double(), shape[-1])
    assert torch.equal(i.cpu(), want_i)
